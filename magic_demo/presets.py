"""Model presets: plain configs naming where the components come from and the video defaults.

`tiny-random` builds seeded random components in code (tests). Folder presets load every component from a
diffusers-style folder (transformer/, vae/, text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/,
image_processor/, scheduler/), e.g. the shipped miniature under assets/ or a real checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from magic_demo.pipeline import MagicI2VPipeline, PromptTemplate
from magic_demo.quantize import is_quantized, load_quantized, quantize_int8

ASSETS = Path(__file__).resolve().parent.parent / "assets"
QUANTIZE_MODES = ("int8", "none")
INT8_SUBFOLDER = "transformer_int8"  # optional pre-quantized transformer beside transformer/


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    build: Optional[Callable[[], dict]] = None  # components built in code
    path: Optional[Path] = None  # or loaded from a diffusers-style folder
    width: int = 64
    height: int = 64
    buckets: tuple[tuple[int, int], ...] = ((64, 64),)  # (width, height) the first frame is fitted to
    fps: int = 8
    window_frames: int = 33
    steps: int = 4
    seconds: float = 4.0
    guidance_scale: float = 1.0
    prompt_template: PromptTemplate = field(default_factory=PromptTemplate)
    text_to_image: Optional[Callable[[], object]] = None  # builds a first_frame.TextToImage
    gallery_index: Optional[Path] = None  # retrieval index folder (RetrievalIndex.load)


def _tiny_random() -> dict:
    from magic_demo.tiny import build_tiny_components

    return build_tiny_components(seed=0)


def _tiny_text_to_image():
    from magic_demo.first_frame import TextToImage

    return TextToImage.tiny_random(seed=0)


def _mini_text_to_image():
    from magic_demo.mini_t2i import load_mini_text_to_image

    return load_mini_text_to_image(ASSETS / "mini" / "t2i")


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("tiny-random", "seeded random tiny components built in code (tests; output is noise)",
               build=_tiny_random, width=32, height=32, buckets=((32, 32),), fps=8, window_frames=9, seconds=2.0,
               text_to_image=_tiny_text_to_image, gallery_index=ASSETS / "gallery_index"),
        Preset("mini", "miniature models trained on CPU on the procedural shapes world (assets/mini)",
               path=ASSETS / "mini", width=64, height=64, buckets=((64, 64),), fps=8, window_frames=17,
               seconds=4.0, text_to_image=_mini_text_to_image, gallery_index=ASSETS / "gallery_index"),
    ]
}
DEFAULT_PRESET = "tiny-random"


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}") from None


COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "image_processor",
              "scheduler")


def load_component(root: Path, name: str, int8_if_available: bool = True):
    """Load one component from its subfolder of a diffusers-style preset folder, offline."""
    from diffusers import (AutoencoderKLHunyuanVideo, AutoencoderTiny, FlowMatchEulerDiscreteScheduler,
                           HunyuanVideoTransformer3DModel)
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPTextModel, LlavaForConditionalGeneration

    sub = root / name
    if name == "transformer" and int8_if_available and (root / INT8_SUBFOLDER).is_dir():
        return load_quantized(HunyuanVideoTransformer3DModel, root / INT8_SUBFOLDER)
    if not sub.is_dir():
        raise FileNotFoundError(f"preset folder {root} lacks {name}/")
    if name == "vae":
        vae_cls = {"AutoencoderKLHunyuanVideo": AutoencoderKLHunyuanVideo, "AutoencoderTiny": AutoencoderTiny}
        return vae_cls[json.loads((sub / "config.json").read_text())["_class_name"]].from_pretrained(
            sub, local_files_only=True)
    if name.startswith("tokenizer"):
        return AutoTokenizer.from_pretrained(sub, local_files_only=True, padding_side="right")
    cls = {"transformer": HunyuanVideoTransformer3DModel, "text_encoder": LlavaForConditionalGeneration,
           "text_encoder_2": CLIPTextModel, "image_processor": CLIPImageProcessor,
           "scheduler": FlowMatchEulerDiscreteScheduler}[name]
    return cls.from_pretrained(sub, local_files_only=True)


def load_components(path: str | Path, int8_if_available: bool = True, names=COMPONENTS) -> dict:
    """Load components from a diffusers-style folder, offline (local files only)."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"preset folder {root} does not exist")
    return {name: load_component(root, name, int8_if_available) for name in names}


def save_components(components: dict, path: str | Path) -> Path:
    """Write components in the folder layout `load_components` reads (safetensors weights)."""
    root = Path(path)
    for name, comp in components.items():
        if hasattr(comp, "save_pretrained"):
            kwargs = {"safe_serialization": True} if isinstance(comp, torch.nn.Module) else {}
            comp.save_pretrained(root / name, **kwargs)
    return root


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def load_pipeline(preset: str | Preset, quantize: str = "int8", device: Optional[str | torch.device] = None
                  ) -> MagicI2VPipeline:
    """Build the pipeline for a preset: int8 weights (default) with fp32 activations on CPU, bf16 on CUDA."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got {quantize!r}")
    device = torch.device(device) if device is not None else default_device()
    comps = preset.build() if preset.build is not None else load_components(preset.path, quantize == "int8")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for name in ("transformer", "text_encoder", "text_encoder_2"):
        module = comps[name]
        if not is_quantized(module) and module.dtype != dtype:
            module.to(dtype)
        if quantize == "int8":
            quantize_int8(module)
        module.to(device).eval()
    vae_dtype = torch.float32 if device.type == "cpu" else dtype
    if comps["vae"].dtype != vae_dtype:
        comps["vae"].to(dtype=vae_dtype)
    comps["vae"].to(device).eval()
    pipe = MagicI2VPipeline(**comps, prompt_template=preset.prompt_template)
    pipe.preset = preset
    return pipe
