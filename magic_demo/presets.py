"""Model presets: plain configs naming where the components come from and the video defaults.

* `tiny-random` builds seeded random components in code (tests; its video is noise).
* `mini` loads the miniature models trained here on CPU (assets/mini_x4; `mini-x8`: the first ones, assets/mini).
* GPU presets load a diffusers-format checkpoint of the HunyuanVideo-I2V architecture from a local folder or a
  Hugging Face hub id (downloaded on the user's machine), with subfolders transformer/, vae/, text_encoder/,
  tokenizer/, text_encoder_2/, tokenizer_2/, image_processor/, scheduler/. A folder may also hold pre-quantized
  `<component>_int8/` folders (written by `python -m magic_demo quantize`), used instead of quantizing at start.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from magic_demo.autoencoder import latent_geometry
from magic_demo.pipeline import MagicI2VPipeline, PromptTemplate
from magic_demo.quantize import is_quantized, load_quantized, quantize_int8, save_quantized

ASSETS = Path(__file__).resolve().parent.parent / "assets"
QUANTIZE_MODES = ("int8", "none")
COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "image_processor",
              "scheduler")
QUANTIZABLE = ("transformer", "text_encoder", "text_encoder_2")
REAL_BUCKETS = ((960, 544), (544, 960), (624, 832), (832, 624), (720, 720))

# HunyuanVideo-I2V's LLaVA prompt format (the image placeholder expands to the vision tower's 576 tokens).
HUNYUAN_I2V_TEMPLATE = PromptTemplate(
    template=("<|start_header_id|>system<|end_header_id|>\n\n<image>\nDescribe the video by detailing the following "
              "aspects according to the reference image: 1. The main content and theme of the video.2. The color, "
              "shape, size, texture, quantity, text, and spatial relationships of the objects.3. Actions, events, "
              "behaviors temporal relationships, physical movement changes of the objects.4. background "
              "environment, light, style and atmosphere.5. camera angles, movements, and transitions used in the "
              "video:<|eot_id|>\n\n<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"),
    max_prompt_tokens=256, hidden_layer=-3, image_token_stride=4, clip_max_tokens=77)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    build: Optional[Callable[[], dict]] = None  # components built in code
    path: Optional[str | Path] = None  # or a diffusers-style folder / hub id
    width: int = 64
    height: int = 64
    buckets: tuple[tuple[int, int], ...] = ((64, 64),)  # (width, height) the first frame is fitted to
    fps: int = 8
    window_frames: int = 33
    steps: int = 4
    seconds: float = 4.0
    guidance_scale: float = 1.0  # guidance input w of a CFG-distilled transformer (~ two-pass CFG at 1 + w)
    prompt_template: PromptTemplate = field(default_factory=PromptTemplate)
    text_to_image: Optional[Callable[[], object]] = None  # builds a text_to_image.TextToImage
    gallery_index: Optional[Path] = None  # retrieval index folder (RetrievalIndex.load)
    gpu_memory_gib: Optional[float] = None  # documented need (int8, offload), for the README table
    offload: bool = False  # model CPU offload of the encoders while the transformer runs (CUDA)
    vae_tiling: bool = False  # tiled VAE decode (large frames)
    transformer_folder: str = "transformer"  # subfolder holding the denoiser (a preset folder may hold several)
    true_cfg_scale: float = 1.0  # > 1: two-pass CFG by default (an undistilled teacher)
    image_guidance_scale: float = 1.0  # != 1: one more pass per step, guided toward the first frame (pipeline.denoise)


def _tiny_random() -> dict:
    from magic_demo.tiny import build_tiny_components

    return build_tiny_components(seed=0)


def _tiny_text_to_image():
    from magic_demo.text_to_image import TextToImage

    return TextToImage.tiny_random(seed=0)


def _mini_text_to_image():
    from magic_demo.mini_t2i import load_mini_text_to_image

    return load_mini_text_to_image(ASSETS / "mini" / "t2i")


def _turbo_text_to_image():
    from magic_demo.text_to_image import TextToImage

    return TextToImage.from_pretrained("stabilityai/sdxl-turbo", num_inference_steps=2, guidance_scale=0.0)


_REAL = dict(width=960, height=544, buckets=REAL_BUCKETS, fps=24, window_frames=81, seconds=5.0,
             prompt_template=HUNYUAN_I2V_TEMPLATE, text_to_image=_turbo_text_to_image, offload=True, vae_tiling=True)
# The miniature world's video defaults; `mini` runs the models on the x4 VAE (16x16 latents, assets/mini_x4), whose
# T2I first-frame model and retrieval gallery are the first models' (assets/mini/t2i, assets/mini/clip): both take
# and give pixels. `mini-x8*` are the first miniature models (x8 VAE, 8x8 latents, assets/mini), kept for the
# Table 1 comparison and the measurements made with them.
_MINI_X8 = dict(path=ASSETS / "mini", width=64, height=64, buckets=((64, 64),), fps=8, window_frames=17, seconds=4.0,
                text_to_image=_mini_text_to_image, gallery_index=ASSETS / "gallery_index")
_MINI = {**_MINI_X8, "path": ASSETS / "mini_x4"}

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("tiny-random", "seeded random tiny components built in code (tests; output is noise)",
               build=_tiny_random, width=32, height=32, buckets=((32, 32),), fps=8, window_frames=9, seconds=2.0,
               text_to_image=_tiny_text_to_image, gallery_index=ASSETS / "gallery_index"),
        Preset("mini", "miniature models trained on CPU on the procedural shapes world (assets/mini_x4: x4 VAE, "
               "16x16 latents); the 4-step student: the teacher CFG-distilled and tuned on its own 4-step samples, run "
               "at 4 steps with guidance input 1 (see assets/mini_x4/TRAINING.md)", guidance_scale=1.0, **_MINI),
        Preset("mini-teacher", "the undistilled miniature teacher (assets/mini_x4/teacher): Euler with two-pass CFG",
               steps=16, true_cfg_scale=4.0, transformer_folder="teacher", **_MINI),
        Preset("mini-x8", "the first miniature models (assets/mini: x8 VAE, 8x8 latents), their 4-step student, "
               "guidance input 1 (see assets/mini/training.json)", guidance_scale=1.0, **_MINI_X8),
        Preset("mini-x8-8step", "the first miniature models' 8-step DMD2 student (Table 1 comparison)", steps=8,
               guidance_scale=3.0, transformer_folder="student_8step", **_MINI_X8),
        Preset("mini-x8-teacher", "the first miniature models' undistilled teacher: Euler with two-pass CFG (Table 1 "
               "comparison)", steps=16, true_cfg_scale=4.0, transformer_folder="teacher", **_MINI_X8),
        Preset("hunyuan-i2v", "HunyuanVideo-I2V (diffusers format, 33-channel latent_concat), 50 Euler steps: "
               "the undistilled base", path=os.environ.get("HUNYUAN_I2V_PATH", "hunyuanvideo-community/HunyuanVideo-I2V"),
               steps=50, gpu_memory_gib=24.0, **_REAL),
        Preset("magic141", "Magic 1-For-1 4-step distilled DiT (a converted checkpoint folder, see `convert`) on the "
               "HunyuanVideo-I2V components", path=os.environ.get("MAGIC141_PATH", "checkpoints/magic141"), steps=4,
               gpu_memory_gib=24.0, **_REAL),
    ]
}
DEFAULT_PRESET = "mini"  # the miniature models trained here: meaningful video on any CPU


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}") from None


def resolve_folder(path: str | Path) -> Path:
    """A local folder as is; otherwise a hub id, downloaded (or found in the cache) on this machine."""
    local = Path(path)
    if local.is_dir():
        return local
    if local.is_absolute() or str(path).startswith(".") or str(path).count("/") != 1:
        raise FileNotFoundError(f"preset folder {path} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path)))
    except Exception as exc:  # offline, unknown repo, gated: all end here with the hub's reason
        raise FileNotFoundError(f"cannot get {path} from the Hugging Face hub ({type(exc).__name__}: {exc}); "
                                f"download it or point the preset at a local folder") from exc


def _classes() -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPTextModel, LlavaForConditionalGeneration

    return {"transformer": HunyuanVideoTransformer3DModel, "text_encoder": LlavaForConditionalGeneration,
            "text_encoder_2": CLIPTextModel, "image_processor": CLIPImageProcessor,
            "scheduler": FlowMatchEulerDiscreteScheduler}


def load_component(root: Path, name: str, int8_if_available: bool = True, folder: Optional[str] = None):
    """Load component `name` from its subfolder (`folder`, default the name) of a preset folder, offline."""
    from diffusers import AutoencoderKLHunyuanVideo, AutoencoderTiny
    from transformers import AutoTokenizer

    folder = folder or name
    if name in QUANTIZABLE and int8_if_available and (root / f"{folder}_int8").is_dir():
        return load_quantized(_classes()[name], root / f"{folder}_int8")
    sub = root / folder
    if not sub.is_dir():
        raise FileNotFoundError(f"preset folder {root} lacks {folder}/")
    if name == "vae":
        vae_cls = {"AutoencoderKLHunyuanVideo": AutoencoderKLHunyuanVideo, "AutoencoderTiny": AutoencoderTiny}
        return vae_cls[json.loads((sub / "config.json").read_text())["_class_name"]].from_pretrained(
            sub, local_files_only=True)
    if name.startswith("tokenizer"):
        return AutoTokenizer.from_pretrained(sub, local_files_only=True, padding_side="right")
    return _classes()[name].from_pretrained(sub, local_files_only=True)


def load_components(path: str | Path, int8_if_available: bool = True, names=COMPONENTS,
                    transformer_folder: str = "transformer") -> dict:
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"preset folder {root} does not exist")
    return {name: load_component(root, name, int8_if_available, transformer_folder if name == "transformer" else None)
            for name in names}


def save_components(components: dict, path: str | Path) -> Path:
    """Write components in the folder layout `load_components` reads (safetensors weights); quantized models go
    to `<name>_int8/` with their quantization map."""
    root = Path(path)
    for name, comp in components.items():
        if isinstance(comp, torch.nn.Module) and is_quantized(comp):
            save_quantized(comp, root / f"{name}_int8")
        elif hasattr(comp, "save_pretrained"):
            kwargs = {"safe_serialization": True} if isinstance(comp, torch.nn.Module) else {}
            comp.save_pretrained(root / name, **kwargs)
    return root


def save_prequantized(preset: str | Preset, out: str | Path) -> Path:
    """`python -m magic_demo quantize`: the preset's components with int8 transformer and text encoders."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    comps = preset.build() if preset.build is not None else load_components(resolve_folder(preset.path), False)
    for name in QUANTIZABLE:
        quantize_int8(comps[name].float())
    return save_components(comps, out)


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def check_compatible(comps: dict) -> None:
    t, c = comps["transformer"].config, comps["vae"].config.latent_channels
    if t.image_condition_type != "latent_concat" or t.in_channels != 2 * c + 1:
        raise ValueError(f"transformer must be an image_condition_type='latent_concat' model with 2C+1 = {2 * c + 1} "
                         f"input channels, got {t.image_condition_type!r} with {t.in_channels}")


def load_pipeline(preset: str | Preset, quantize: str = "int8", device: Optional[str | torch.device] = None,
                  compile: bool = False) -> MagicI2VPipeline:
    """Build the pipeline for a preset: int8 weights (default) with fp32 activations on CPU, bf16 on CUDA.

    compile=True wraps the transformer in torch.compile (opt-in): it fuses the many small ops of a miniature
    transformer on CPU, but the first window of every new window length pays the compile (tens of seconds)."""
    from magic_demo.memory import check_fits, estimate_preset_memory

    preset = get_preset(preset) if isinstance(preset, str) else preset
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got {quantize!r}")
    device = torch.device(device) if device is not None else default_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if preset.build is not None:
        comps = preset.build()
    else:
        root = resolve_folder(preset.path)
        if device.type == "cuda":  # know before loading whether it fits
            estimate = estimate_preset_memory(root, dtype, quantize, offload=preset.offload,
                                              tokens=_window_tokens(root, preset))
            print(f"[magic_demo] {preset.name}: {estimate.describe()}")
            check_fits(estimate, device)
        comps = load_components(root, quantize == "int8", transformer_folder=preset.transformer_folder)
    check_compatible(comps)
    for name in QUANTIZABLE:
        module = comps[name]
        if not is_quantized(module) and module.dtype != dtype:
            module.to(dtype)
        if quantize == "int8":
            quantize_int8(module)
        module.eval()
    vae_dtype = torch.float32 if device.type == "cpu" else dtype
    if comps["vae"].dtype != vae_dtype:
        comps["vae"].to(dtype=vae_dtype)
    if device.type == "cpu" and latent_geometry(comps["vae"]).temporal_ratio == 1:
        comps["vae"].to(memory_format=torch.channels_last)  # a 2D-conv (per-frame) VAE: ~12% faster on CPU
    if preset.vae_tiling and hasattr(comps["vae"], "enable_tiling"):
        comps["vae"].enable_tiling()
    pipe = MagicI2VPipeline(**comps, prompt_template=preset.prompt_template)
    if preset.offload and device.type == "cuda":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    if compile:
        pipe.transformer.compile()
    pipe.preset = preset
    return pipe


def _window_tokens(root: Path, preset: Preset) -> int:
    """Transformer tokens of one window at the preset's default size (for the activation estimate)."""
    t = json.loads((root / preset.transformer_folder / "config.json").read_text())
    v = json.loads((root / "vae" / "config.json").read_text())
    spatial, temporal = v.get("spatial_compression_ratio", 8), v.get("temporal_compression_ratio", 1)
    frames = (preset.window_frames - 1) // temporal + 1
    return frames * (preset.height // spatial // t["patch_size"]) * (preset.width // spatial // t["patch_size"])
