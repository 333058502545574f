"""The miniature text-to-image first-frame model: rectified flow at 64x64, in the video VAE's latent space or
in pixels.

Routes (see assets/mini/t2i/TRAINING.md for the measurements): with a ``vae`` component (the miniature world's
per-frame ``AutoencoderTiny``) the denoiser works on its 16 x 8 x 8 latents, like the real text-to-image models,
and the decoder draws the crisp edges; without one it works directly on RGB pixels (3 channels, [-1, 1]; a
64x64 image in 4x4 patches is 256 tokens). Components, all diffusers/transformers classes:

* ``transformer``: ``PixArtTransformer2DModel`` (in/out = latent or RGB channels, adaLN-single timestep
  conditioning, text cross-attention, no additional conditions), predicting the flow velocity ``noise - x0``;
* ``vae`` (optional): ``AutoencoderTiny``, frozen, scaled latents as ``magic_demo.autoencoder`` defines them;
* ``text_encoder``: a small ``CLIPTextModel`` over the world's word-level tokenizer, trained jointly;
* ``tokenizer``: ``magic_demo.tiny.build_word_tokenizer()`` (fixed length, right padding);
* ``scheduler``: ``FlowMatchEulerDiscreteScheduler`` (Euler, shifted sigmas as in ``magic_demo.sampling``).

Classifier-free guidance (the model was trained with ~10% empty captions) is on when ``guidance_scale > 1``.
``load_mini_text_to_image()`` gives the shipped model as a ``text_to_image.TextToImage`` for the presets, and
``evaluate_t2i()`` scores colour, shape and background of generated images with ``world.py``'s analyser on
held-out captions (captions the trainer never shows the model).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from diffusers import (AutoencoderTiny, DiffusionPipeline, FlowMatchEulerDiscreteScheduler,
                       PixArtTransformer2DModel, UNet2DConditionModel)
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from PIL import Image
from transformers import CLIPTextModel, PreTrainedTokenizerFast

from magic_demo import world
from magic_demo.autoencoder import decode_latents, encode_video, latent_geometry
from magic_demo.sampling import MAX_STEPS, build_sigmas

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "assets" / "mini" / "t2i"
GENERATION_FILE = "generation.json"  # default steps / guidance measured by the trainer
OUTPUT_TYPES = ("pil", "np", "pt")
HELDOUT_SEED = 20240605
HELDOUT_COUNT = 64


# --------------------------------------------------------------------------------------------- pipeline
class MiniT2IPipeline(DiffusionPipeline):
    """Text -> 64x64 RGB first frame with a flow-matching denoiser, in latent or pixel space (module docstring)."""

    model_cpu_offload_seq = "text_encoder->transformer->unet->vae"
    _optional_components = ["transformer", "unet", "vae"]

    def __init__(self, text_encoder: CLIPTextModel, tokenizer: PreTrainedTokenizerFast,
                 scheduler: FlowMatchEulerDiscreteScheduler, transformer: Optional[PixArtTransformer2DModel] = None,
                 unet: Optional[UNet2DConditionModel] = None, vae: Optional[AutoencoderTiny] = None):
        super().__init__()
        if (transformer is None) == (unet is None):
            raise ValueError("give exactly one denoiser: `transformer` (PixArt) or `unet` (UNet2DConditionModel)")
        self.register_modules(transformer=transformer, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                              scheduler=scheduler, vae=vae)

    # ---- helpers
    @property
    def denoiser(self) -> torch.nn.Module:
        return self.transformer if self.transformer is not None else self.unet

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel (1 in pixel space); TextToImage reads this to round sizes."""
        return latent_geometry(self.vae).spatial_ratio if self.vae is not None else 1

    @property
    def patch_size(self) -> int:
        """Height and width must be multiples of this (pixels per patch, or per the UNet's total downsampling)."""
        if self.transformer is not None:
            return int(self.transformer.config.patch_size) * self.vae_scale_factor
        return 2 ** (len(self.unet.config.block_out_channels) - 1) * self.vae_scale_factor

    @property
    def default_size(self) -> int:
        return int(self.denoiser.config.sample_size) * self.vae_scale_factor

    def sample_shape(self, n: int, height: int, width: int) -> tuple[int, int, int, int]:
        """Shape of what the denoiser works on: latents [n, C, h, w] (or pixels [n, 3, H, W])."""
        f = self.vae_scale_factor
        return (n, int(self.denoiser.config.in_channels), height // f, width // f)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Training targets: images [B, 3, H, W] in [-1, 1] -> what the denoiser generates (scaled latents)."""
        if self.vae is None:
            return images
        return encode_video(self.vae, images[:, :, None])[:, :, 0]

    @property
    def max_tokens(self) -> int:
        n = int(getattr(self.tokenizer, "model_max_length", 16) or 16)
        return min(n, int(self.text_encoder.config.max_position_embeddings))

    def check_inputs(self, prompt, negative_prompt, height, width, num_inference_steps, guidance_scale,
                     num_images_per_prompt, output_type, latents, generator) -> list[str]:
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        else:
            raise ValueError(f"`prompt` must be a string or a non-empty list of strings, got {type(prompt).__name__}")
        if any(not p.strip() for p in prompts):
            raise ValueError("`prompt` must not be empty")
        if negative_prompt is not None:
            neg = [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt
            if not isinstance(neg, (list, tuple)) or not all(isinstance(p, str) for p in neg) or \
                    len(neg) not in (1, len(prompts)):
                raise ValueError("`negative_prompt` must be a string or a list of strings as long as `prompt`")
        p = self.patch_size
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0 or v % p:
                raise ValueError(f"`{name}` must be a positive multiple of {p} (the patch size), got {v!r}")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) or \
                not 1 <= num_inference_steps <= MAX_STEPS:
            raise ValueError(f"`num_inference_steps` must be an integer in 1..{MAX_STEPS}, got {num_inference_steps!r}")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or \
                not np.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be a finite number >= 0, got {guidance_scale!r}")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, (int, np.integer)) or \
                num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be a positive integer, got {num_images_per_prompt!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}")
        n = len(prompts) * num_images_per_prompt
        if latents is not None and tuple(latents.shape) != self.sample_shape(n, height, width):
            raise ValueError(f"`latents` must have shape {self.sample_shape(n, height, width)}, "
                             f"got {tuple(latents.shape)}")
        if isinstance(generator, list) and len(generator) != n:
            raise ValueError(f"`generator` list must have one generator per image ({n}), got {len(generator)}")
        return prompts

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states [B, L, D], attention mask [B, L]) of the CLIP text encoder, fixed length L."""
        device = device or self._execution_device
        tok = self.tokenizer(prompts, padding="max_length", max_length=self.max_tokens, truncation=True,
                             return_tensors="pt")
        ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
        hidden = self.text_encoder(ids, attention_mask=mask).last_hidden_state
        return hidden, mask

    def prepare_latents(self, n, height, width, generator, latents, device) -> torch.Tensor:
        if latents is not None:
            return latents.to(device=device, dtype=torch.float32)
        shape = self.sample_shape(n, height, width)
        if isinstance(generator, list):
            return torch.cat([torch.randn((1,) + shape[1:], generator=g, device=device) for g in generator])
        return torch.randn(shape, generator=generator, device=device)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        t = t.expand(x.shape[0]) if t.ndim else t.repeat(x.shape[0])
        return denoise(self, x, t, context, mask).float()

    # ---- generation
    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, list[str]] = None,
        negative_prompt: Optional[Union[str, list[str]]] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: int = 8,
        guidance_scale: float = 1.0,
        num_images_per_prompt: int = 1,
        generator: Optional[Union[torch.Generator, list[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Optional[Callable[[Any, int, torch.Tensor, dict], dict]] = None,
    ):
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        device = self._execution_device

        # 1. Check inputs
        prompts = self.check_inputs(prompt, negative_prompt, height, width, num_inference_steps, guidance_scale,
                                    num_images_per_prompt, output_type, latents, generator)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        n = len(prompts)
        do_cfg = guidance_scale > 1.0

        # 2. Encode the prompt (and the empty / negative prompt for classifier-free guidance)
        context, mask = self.encode_prompt(prompts, device)
        if do_cfg:
            neg = negative_prompt if negative_prompt is not None else ""
            neg = [neg] if isinstance(neg, str) else list(neg)
            neg = (neg * n)[:n] if len(neg) == 1 else [q for q in neg for _ in range(num_images_per_prompt)]
            neg_context, neg_mask = self.encode_prompt(neg, device)
            context, mask = torch.cat([neg_context, context]), torch.cat([neg_mask, mask])

        # 3. Prepare the starting noise (latents or pixels, fp32) and the shifted sigma schedule
        x = self.prepare_latents(n, height, width, generator, latents, device)
        build_sigmas(self.scheduler, int(num_inference_steps))
        timesteps = self.scheduler.timesteps.to(device)

        # 4. Denoise: Euler steps along the flow (scheduler.step: x += v * (sigma_next - sigma))
        with self.progress_bar(total=len(timesteps)) as bar:
            for i, t in enumerate(timesteps):
                if do_cfg:
                    v_uncond, v_text = self.velocity(torch.cat([x, x]), t, context, mask).chunk(2)
                    v = v_uncond + guidance_scale * (v_text - v_uncond)
                else:
                    v = self.velocity(x, t, context, mask)
                x = self.scheduler.step(v, t, x, return_dict=False)[0]
                if callback_on_step_end is not None:
                    out = callback_on_step_end(self, i, t, {"latents": x}) or {}
                    x = out.get("latents", x)
                bar.update()

        # 5. Decode (latent route) and output: [-1, 1] pixels -> PIL / numpy [0, 1] / tensor [0, 1]
        if self.vae is not None:
            x = decode_latents(self.vae, x[:, :, None])[:, :, 0]
        images = ((x.clamp(-1, 1) + 1) / 2).float().cpu()
        if output_type == "pil":
            arr = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
            images = [Image.fromarray(a) for a in arr]
        elif output_type == "np":
            images = images.permute(0, 2, 3, 1).numpy()
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def denoise(pipe: MiniT2IPipeline, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
            mask: torch.Tensor) -> torch.Tensor:
    """Velocity prediction of whichever denoiser the pipeline holds (t: timesteps [B] = 1000 * sigma)."""
    if pipe.transformer is not None:
        return pipe.transformer(x.to(pipe.transformer.dtype), encoder_hidden_states=context, timestep=t,
                                encoder_attention_mask=mask,
                                added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    return pipe.unet(x.to(pipe.unet.dtype), t, encoder_hidden_states=context, encoder_attention_mask=mask).sample


# --------------------------------------------------------------------------------------------- building / loading
def build_mini_t2i(model_cfg: dict, shift: float = 3.0, seed: int = 0,
                   vae: Optional[AutoencoderTiny] = None) -> MiniT2IPipeline:
    """A freshly initialised pipeline from a small config dict; with a (frozen, trained) ``vae`` the denoiser
    works on its latents.

    ``arch="pixart"`` (keys heads, head_dim, layers, patch) or ``arch="unet"`` (keys channels, attention blocks
    only at the lowest resolution); both: text_hidden, text_layers, size (pixels), max_tokens."""
    from transformers import CLIPTextConfig

    from magic_demo.tiny import EOS_ID, BOS_ID, PAD_ID, build_word_tokenizer

    cfg = {"arch": "pixart", "heads": 4, "head_dim": 32, "layers": 4, "patch": 4, "channels": (32, 64, 96, 128),
           "text_hidden": 64, "text_layers": 2, "size": 64, "max_tokens": 16, **model_cfg}
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer()
    tokenizer.model_max_length = int(cfg["max_tokens"])
    h = int(cfg["text_hidden"])
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=h, intermediate_size=2 * h, num_hidden_layers=int(cfg["text_layers"]),
        num_attention_heads=max(1, h // 32), max_position_embeddings=int(cfg["max_tokens"]), pad_token_id=PAD_ID,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, projection_dim=h))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=float(shift))
    channels = latent_geometry(vae).channels if vae is not None else 3
    side = int(cfg["size"]) // (latent_geometry(vae).spatial_ratio if vae is not None else 1)
    if cfg["arch"] == "pixart":
        width = int(cfg["heads"]) * int(cfg["head_dim"])
        denoiser = {"transformer": PixArtTransformer2DModel(
            num_attention_heads=int(cfg["heads"]), attention_head_dim=int(cfg["head_dim"]), in_channels=channels,
            out_channels=channels, num_layers=int(cfg["layers"]), cross_attention_dim=width, sample_size=side,
            patch_size=int(cfg["patch"]), caption_channels=h, use_additional_conditions=False, norm_num_groups=1)}
    elif cfg["arch"] == "unet":
        ch = tuple(int(c) for c in cfg["channels"])
        n = len(ch)
        denoiser = {"unet": UNet2DConditionModel(
            sample_size=side, in_channels=channels, out_channels=channels, layers_per_block=1, block_out_channels=ch,
            down_block_types=("DownBlock2D",) * (n - 1) + ("CrossAttnDownBlock2D",),
            up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (n - 1), cross_attention_dim=h,
            attention_head_dim=int(cfg.get("unet_head_dim", 32)), norm_num_groups=int(cfg.get("norm_groups", 8)))}
    else:
        raise ValueError(f"`arch` must be 'pixart' or 'unet', got {cfg['arch']!r}")
    if vae is not None:
        vae = vae.eval().requires_grad_(False)
    pipe = MiniT2IPipeline(text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, vae=vae, **denoiser)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_mini_t2i(path: Union[str, Path] = DEFAULT_PATH) -> MiniT2IPipeline:
    """Load an exported pipeline folder (model_index.json + safetensors), offline."""
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"no mini T2I model at {path} (missing model_index.json); "
                                "train one with `python -m magic_demo.train.t2i`")
    pipe = MiniT2IPipeline.from_pretrained(str(path), local_files_only=True)
    for module in (pipe.denoiser, pipe.text_encoder, pipe.vae):
        if module is not None:
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generation_defaults(path: Union[str, Path] = DEFAULT_PATH) -> dict:
    """Sampling settings measured best by the trainer (steps, guidance); safe defaults if absent."""
    out = {"num_inference_steps": 8, "guidance_scale": 2.0}
    f = Path(path) / GENERATION_FILE
    if f.is_file():
        out.update({k: v for k, v in json.loads(f.read_text()).items() if k in out})
    return out


def load_mini_text_to_image(path: Union[str, Path] = DEFAULT_PATH):
    """The shipped mini T2I model as a ``text_to_image.TextToImage`` generating at its native 64x64."""
    from magic_demo.text_to_image import TextToImage

    pipe = load_mini_t2i(path)
    d = generation_defaults(path)
    size = pipe.default_size
    return TextToImage(pipe, model_id=f"mini-t2i ({Path(path).name})", native_size=(size, size),
                       num_inference_steps=int(d["num_inference_steps"]), guidance_scale=float(d["guidance_scale"]))


# --------------------------------------------------------------------------------------------- evaluation
def heldout_captions(n: int = HELDOUT_COUNT) -> list[str]:
    """A fixed set of distinct world captions the trainer never trains on (the first ``n`` of 64)."""
    rng = np.random.default_rng(HELDOUT_SEED)
    seen: list[str] = []
    while len(seen) < HELDOUT_COUNT:
        c = world.caption(world.sample_spec(rng))
        if c not in seen:
            seen.append(c)
    return seen[:n]


HELDOUT_SET = frozenset(heldout_captions())


def classify_background(rgb) -> str:
    """Nearest world background colour (Euclidean) to an RGB value."""
    c = np.asarray(rgb, np.float64)
    return min(world.BACKGROUNDS, key=lambda k: float(np.linalg.norm(c - np.asarray(world.BACKGROUNDS[k]))))


def analyse_image(image) -> dict:
    """Colour, shape and background classes of one generated frame (world.py's analyser)."""
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    bg = world.estimate_background(arr)
    found = world.find_shape(arr, bg)
    colour = world.classify_colour(found["colour"]) if found["colour"] is not None else None
    return {"colour": colour, "shape": world.classify_shape(found["mask"]), "background": classify_background(bg),
            "area": found["area"]}


def evaluate_t2i(pipe: MiniT2IPipeline, n: int = 50, seed: int = 0, num_inference_steps: Optional[int] = None,
                 guidance_scale: Optional[float] = None, batch_size: int = 25, return_images: bool = False) -> dict:
    """Generate one image for each of ``n`` held-out captions (cycled past 64) and score them.

    Returns accuracies (fractions) for colour, shape, background and colour+shape together, plus the settings.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"`n` must be a positive integer, got {n!r}")
    d = {"num_inference_steps": 8, "guidance_scale": 2.0}
    steps = int(num_inference_steps or d["num_inference_steps"])
    guidance = float(d["guidance_scale"] if guidance_scale is None else guidance_scale)
    pool = heldout_captions()
    caps = [pool[i % len(pool)] for i in range(n)]
    images, rows = [], []
    for s in range(0, n, batch_size):
        chunk = caps[s:s + batch_size]
        gens = [torch.Generator().manual_seed(seed * 100003 + s + i) for i in range(len(chunk))]
        out = pipe(prompt=chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                   output_type="pil").images
        images.extend(out)
    for cap, img in zip(caps, images):
        want = world.parse_caption(cap)
        got = analyse_image(img)
        rows.append({"caption": cap, **{k: got[k] for k in ("colour", "shape", "background")},
                     "colour_ok": got["colour"] == want["colour"], "shape_ok": got["shape"] == want["shape"],
                     "background_ok": got["background"] == want["background"]})
    acc = lambda key: float(np.mean([r[key] for r in rows]))  # noqa: E731
    result = {"n": n, "num_inference_steps": steps, "guidance_scale": guidance, "colour": acc("colour_ok"),
              "shape": acc("shape_ok"), "background": acc("background_ok"),
              "colour_and_shape": float(np.mean([r["colour_ok"] and r["shape_ok"] for r in rows])), "rows": rows}
    if return_images:
        result["images"] = images
    return result
