import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

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


ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_FIRST_FRAME = ROOT / "assets" / "examples" / "red_circle.png"
EXAMPLE_PROMPT = "a red circle moves left on a black background"  # issue 5's example


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The real Gradio app (tiny-random preset) on a free loopback port, for one test module."""
    demo, service, url = launch_app(tmp_path_factory.mktemp("app"), preset="tiny-random", queue=8,
                                    max_file_size="20mb")
    yield url, service
    demo.close()


@pytest.fixture
def client(server):
    from gradio_client import Client

    return Client(server[0], verbose=False)


def launch_app(tmp_path, preset="mini", queue=32, max_file_size=None):
    """The real Gradio app on a preset (the shipped `mini` by default) on a free loopback port, in this process.
    Returns (demo, service, url); the caller closes the demo."""
    from magic_demo.presets import ASSETS
    from magic_demo.service import DemoService
    from magic_demo.ui import build_app

    service = DemoService(preset, outputs_dir=tmp_path / "outputs")
    service.warm_up()
    demo = build_app(service).queue(max_size=queue, default_concurrency_limit=1)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                allowed_paths=[str(tmp_path), str(ASSETS)], max_file_size=max_file_size, show_error=True)
    return demo, service, f"http://127.0.0.1:{port}/"
