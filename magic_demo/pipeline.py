"""The Magic 1-For-1 image-to-video pipeline over explicit diffusers/transformers components.

One call of the pipeline makes one clip (one window). The sliding-window engine (`magic_demo.video`) calls
its pieces directly so that the prompt and image tokens are encoded once per video.

Conditioning (as in the paper): the image latent sits in frame 0 of a zero tensor shaped like the video
latent, a binary mask is 1 on frame 0, and [noisy latent, image latent, mask] are concatenated on channels
(2C+1 inputs of a `HunyuanVideoTransformer3DModel` with image_condition_type="latent_concat").
Text: LLaVA hidden states; the VLM's image tokens are prepended to the prompt tokens; CLIP text gives the
pooled vector.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from magic_demo.autoencoder import decode_latents, encode_video, latent_geometry, video_to_uint8
from magic_demo.sampling import MAX_STEPS, build_sigmas, sample_euler
from magic_demo.windows import match_colours

SIZE_MULTIPLE = 16


@dataclass(frozen=True)
class PromptTemplate:
    """How a prompt is wrapped for the LLaVA text encoder. `{}` marks the prompt; `<image>` the image tokens."""

    template: str = "<image> describe the video: {}"
    max_prompt_tokens: int = 32
    hidden_layer: int = -3  # hidden_states index used as text features (the paper: third from last)
    image_token_stride: int = 1  # keep every n-th image token (the real model keeps every 4th of 576)
    clip_max_tokens: int = 32


@dataclass
class PromptEmbeds:
    embeds: torch.Tensor  # [B, image_tokens + text_tokens, D]
    mask: torch.Tensor  # [B, L]
    pooled: torch.Tensor  # [B, D2]

    def select(self, i: int) -> "PromptEmbeds":
        return PromptEmbeds(self.embeds[i : i + 1], self.mask[i : i + 1], self.pooled[i : i + 1])


def neutral_image(size: tuple[int, int]) -> Image.Image:
    """What the VLM sees for a clip made without its first frame (text-to-video, and image guidance's image-free
    pass): plain mid-gray, no information. (Masking the image tokens out is not an option: the transformer reads
    its text mask as a prefix length.)"""
    return Image.new("RGB", size, (128, 128, 128))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [1, 3, 1, H, W] in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return (arr.permute(2, 0, 1).to(torch.float32) / 127.5 - 1.0)[None, :, None]


class MagicI2VPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->text_encoder_2->transformer->vae"

    def __init__(self, transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, image_processor,
                 scheduler, prompt_template: Optional[PromptTemplate] = None):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                              image_processor=image_processor, scheduler=scheduler)
        self.prompt_template = prompt_template or PromptTemplate()
        self.calls: Counter = Counter()  # forward calls per component, read by reports and tests
        for name in ("transformer", "text_encoder", "text_encoder_2"):
            getattr(self, name).register_forward_pre_hook(lambda *_, n=name: self.calls.update([n]))

    # ---- properties -------------------------------------------------------------------------------------
    @property
    def geometry(self):
        return latent_geometry(self.vae)

    @property
    def compute_dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def has_guidance_input(self) -> bool:
        return bool(getattr(self.transformer.config, "guidance_embeds", False))

    # ---- 1. inputs --------------------------------------------------------------------------------------
    def check_inputs(self, image, height: int, width: int, num_frames: int, steps: int) -> None:
        if not isinstance(image, Image.Image):
            raise ValueError(f"image must be a PIL.Image, got {type(image).__name__}")
        if image.mode != "RGB":
            raise ValueError(f"image must be RGB, got mode {image.mode!r} (convert it, e.g. with load_upload)")
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % SIZE_MULTIPLE:
                raise ValueError(f"{name} must be a positive multiple of {SIZE_MULTIPLE}, got {value!r}")
        if not self.geometry.valid_num_frames(num_frames):
            raise ValueError(f"num_frames must be {self.geometry.temporal_ratio}k+1, got {num_frames!r}")
        if not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"steps must be an integer between 1 and {MAX_STEPS}, got {steps!r}")

    # ---- 2. encode --------------------------------------------------------------------------------------
    def _llava_inputs(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
        tpl, tok = self.prompt_template, self.tokenizer
        image_id = self.text_encoder.config.image_token_index
        n_image = self.text_encoder.config.image_seq_length
        prefix = tok(tpl.template.split("{}")[0], add_special_tokens=True).input_ids
        # The prefix tokenised alone may gain an end token; the prompt starts where the prefix's own tokens end.
        crop_start = len(prefix) - (1 if tok.eos_token_id is not None and prefix[-1] == tok.eos_token_id else 0)
        enc = tok([tpl.template.format(t) for t in texts], padding="max_length", truncation=True,
                  max_length=crop_start + tpl.max_prompt_tokens + 1, return_tensors="pt")
        ids, mask = enc.input_ids, enc.attention_mask
        pos = (ids[0] == image_id).nonzero().flatten()
        if len(pos) != 1 or not bool(((ids == image_id).sum(1) == 1).all()):
            raise ValueError("prompt_template must contain exactly one <image> placeholder before the prompt")
        p = int(pos[0])
        # Expand the single placeholder into the vision tower's patch count.
        ids = torch.cat([ids[:, :p], ids.new_full((len(texts), n_image), image_id), ids[:, p + 1 :]], 1)
        mask = torch.cat([mask[:, :p], mask.new_ones((len(texts), n_image)), mask[:, p + 1 :]], 1)
        return ids, mask, crop_start + n_image - 1

    @torch.inference_mode()
    def encode_prompt(self, prompt: str | list[str], image: Image.Image | list[Image.Image],
                      negative_prompt: Optional[str] = None) -> PromptEmbeds:
        """One LLaVA forward (image tokens prepended to text tokens) and one CLIP forward for all texts.

        A list of prompts (with one image each) gives a batch (training). With a negative prompt the batch
        holds [prompt, negative] and PromptEmbeds.select(1) is the negative.
        """
        tpl = self.prompt_template
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        images = [image] * len(texts) if isinstance(image, Image.Image) else list(image)
        if negative_prompt is not None:
            texts, images = texts + [negative_prompt], images + images[:1]
        device = self.text_encoder.device
        ids, mask, crop_start = self._llava_inputs(texts)
        pixels = self.image_processor(images=images, return_tensors="pt").pixel_values
        out = self.text_encoder(input_ids=ids.to(device), attention_mask=mask.to(device),
                                pixel_values=pixels.to(device, self.text_encoder.dtype), output_hidden_states=True)
        hidden = out.hidden_states[tpl.hidden_layer]
        image_pos = ids[0] == self.text_encoder.config.image_token_index
        image_tokens = hidden[:, image_pos][:, :: tpl.image_token_stride]
        text_tokens, text_mask = hidden[:, crop_start:], mask[:, crop_start:].to(device)
        embeds = torch.cat([image_tokens, text_tokens], 1)
        full_mask = torch.cat([text_mask.new_ones(image_tokens.shape[:2]), text_mask], 1)
        # Padding is on the right and masked out as attention keys, so dropping the columns no row uses changes
        # nothing but the work: every transformer forward attends over fewer tokens (49 -> 26 for a mini prompt).
        keep = int(full_mask.sum(1).max())
        embeds, full_mask = embeds[:, :keep], full_mask[:, :keep]

        enc2 = self.tokenizer_2(texts, padding="max_length", truncation=True, max_length=tpl.clip_max_tokens,
                                return_tensors="pt")
        pooled = self.text_encoder_2(input_ids=enc2.input_ids.to(self.text_encoder_2.device)).pooler_output
        return PromptEmbeds(embeds.float(), full_mask, pooled.float())

    @torch.inference_mode()
    def encode_image(self, image: Image.Image) -> torch.Tensor:
        """RGB image -> scaled latent [1, C, 1, h, w]."""
        self.calls.update(["vae_encode"])
        return encode_video(self.vae, image_to_tensor(image))

    def prepare_condition(self, image_latent: torch.Tensor, latent_frames: int) -> torch.Tensor:
        """[image latent in frame 0 of zeros ; mask with 1 on frame 0] -> [B, C+1, T, h, w]."""
        b, c, _, h, w = image_latent.shape
        cond = image_latent.new_zeros((b, c, latent_frames, h, w))
        cond[:, :, :1] = image_latent
        mask = image_latent.new_zeros((b, 1, latent_frames, h, w))
        mask[:, :, 0] = 1.0
        return torch.cat([cond, mask], 1)

    # ---- 3-4. latents and denoising ---------------------------------------------------------------------
    @torch.inference_mode()
    def denoise(self, condition: torch.Tensor, prompt: PromptEmbeds, steps: int, generator: torch.Generator,
                guidance_scale: float = 1.0, true_cfg_scale: float = 1.0, negative: Optional[PromptEmbeds] = None,
                callback: Optional[Callable[[int, torch.Tensor], None]] = None,
                should_stop: Optional[Callable[[], bool]] = None, image_guidance_scale: float = 1.0,
                imageless: Optional[PromptEmbeds] = None) -> torch.Tensor:
        """Sample one window's latents. One transformer forward per step, one more for explicit true CFG and one
        more for image guidance: with `image_guidance_scale` s != 1 and `imageless` (the prompt encoded with
        `neutral_image`), v = v_free + s (v - v_free), where v_free is the velocity without the first frame (zero
        latent and mask, the teacher's text-to-video rows), as InstructPix2Pix guides toward its input image."""
        c = self.geometry.channels
        shape = (condition.shape[0], c, *condition.shape[2:])
        device, dtype = self.transformer.device, self.compute_dtype
        noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
        sigmas, _ = build_sigmas(self.scheduler, steps)
        cond = condition.to(device, dtype)
        guidance = None
        if self.has_guidance_input:  # CFG-distilled student: the scale is an input, one pass per step
            guidance = torch.full((shape[0],), guidance_scale * 1000.0, device=device, dtype=dtype)
        use_image_guidance = image_guidance_scale != 1.0 and imageless is not None
        no_image = torch.zeros_like(cond) if use_image_guidance else None  # no latent, no mask

        def forward(x, p: PromptEmbeds, t, given: torch.Tensor):
            return self.transformer(
                hidden_states=torch.cat([x.to(dtype), given], 1), timestep=t, encoder_hidden_states=p.embeds.to(dtype),
                encoder_attention_mask=p.mask, pooled_projections=p.pooled.to(dtype), guidance=guidance,
                return_dict=False)[0]

        def velocity(x, sigma):
            t = (sigma * 1000.0).expand(x.shape[0]).to(device, dtype)
            v = forward(x, prompt, t, cond)
            if true_cfg_scale > 1.0 and negative is not None:  # classic two-pass CFG, only when asked
                v_neg = forward(x, negative, t, cond)
                v = v_neg + true_cfg_scale * (v - v_neg)
            if use_image_guidance:
                v_free = forward(x, imageless, t, no_image)
                v = v_free + image_guidance_scale * (v - v_free)
            return v

        return sample_euler(velocity, noise, sigmas.to(device), callback, should_stop)

    # ---- 5. decode --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, colour_reference: Optional[np.ndarray] = None) -> torch.Tensor:
        """Latents [1, C, t, h, w] -> frames [T, H, W, 3] uint8; with `colour_reference` (an RGB uint8 image),
        each frame histogram-matched to it (the colour anchor, see windows.py)."""
        self.calls.update(["vae_decode"])
        frames = video_to_uint8(decode_latents(self.vae, latents)[0])
        if colour_reference is None:
            return frames
        return torch.from_numpy(np.stack([match_colours(f, colour_reference) for f in frames.numpy()]))

    # ---- one clip ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def __call__(self, image: Image.Image, prompt: str, num_frames: int, steps: int = 4, seed: int = 0,
                 guidance_scale: float = 1.0, true_cfg_scale: float = 1.0, negative_prompt: str = "",
                 callback: Optional[Callable[[int, torch.Tensor], None]] = None,
                 should_stop: Optional[Callable[[], bool]] = None, colour_anchor: bool = True,
                 image_guidance_scale: float = 1.0) -> torch.Tensor:
        """Generate one clip of `num_frames` frames ([T, H, W, 3] uint8) whose frame 0 follows `image`;
        `colour_anchor` maps every frame's colours back to the image's (False: the model's raw frames);
        `image_guidance_scale` != 1 guides toward the first frame (see `denoise`)."""
        # 1. check inputs
        width, height = image.size if isinstance(image, Image.Image) else (None, None)
        self.check_inputs(image, height, width, num_frames, steps)
        # 2. encode prompt (+ image tokens) and the first frame
        use_cfg = true_cfg_scale > 1.0
        embeds = self.encode_prompt(prompt, image, negative_prompt if use_cfg else None)
        imageless = self.encode_prompt(prompt, neutral_image(image.size)) if image_guidance_scale != 1.0 else None
        image_latent = self.encode_image(image)
        # 3. prepare conditioning
        condition = self.prepare_condition(image_latent, self.geometry.latent_frames(num_frames))
        # 4. denoise
        generator = torch.Generator().manual_seed(seed)
        latents = self.denoise(condition, embeds.select(0), steps, generator, guidance_scale, true_cfg_scale,
                               embeds.select(1) if use_cfg else None, callback, should_stop, image_guidance_scale,
                               imageless)
        # 5. decode
        return self.decode(latents, np.asarray(image) if colour_anchor else None)
