import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_pipe():
    """fp32 tiny-random pipeline (not quantized), shared by the engine tests."""
    from magic_demo.presets import load_pipeline

    return load_pipeline("tiny-random", quantize="none", device="cpu")


@pytest.fixture(scope="session")
def first_frame() -> Image.Image:
    rng = np.random.RandomState(0)
    arr = np.zeros((32, 32, 3), np.uint8)
    arr[8:20, 6:18] = (220, 30, 30)
    return Image.fromarray(np.clip(arr + rng.randint(0, 20, arr.shape), 0, 255).astype(np.uint8))
