"""Generated first frames: a diffusers text-to-image pipeline whose image is snapped to an I2V bucket.

``TextToImage.from_pretrained`` is the GPU path (``AutoPipelineForText2Image``, optional int8 weights via
optimum-quanto); ``TextToImage.tiny_random`` builds a tiny random Stable-Diffusion-style pipeline from configs for
offline tests; the shipped miniature model comes from ``magic_demo.mini_t2i.load_mini_text_to_image``.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
from PIL import Image

from magic_demo.first_frame import FirstFrame, _check_buckets, fit_to_bucket


class TextToImage:
    """Text-to-image first frames through a diffusers pipeline; results are snapped to the I2V bucket.

    ``pipe`` is any diffusers text-to-image pipeline accepting (prompt, width, height, num_inference_steps,
    guidance_scale, generator, output_type='pil'). ``native_size`` makes it generate at a fixed size (for
    models that only work well at their training resolution) and then fit to the bucket; by default it
    generates at the bucket size itself.
    """

    def __init__(
        self,
        pipe: Any,
        *,
        model_id: str = "unknown",
        num_inference_steps: int = 4,
        guidance_scale: float = 0.0,
        native_size: tuple[int, int] | None = None,
        negative_prompt: str | None = None,
    ) -> None:
        self.pipe = pipe
        self.model_id = model_id
        self.num_inference_steps = int(num_inference_steps)
        self.guidance_scale = float(guidance_scale)
        self.native_size = native_size
        self.negative_prompt = negative_prompt
        if hasattr(pipe, "set_progress_bar_config"):  # diffusers pipelines; a plain callable has none
            pipe.set_progress_bar_config(leave=False)

    # ---- constructors
    @classmethod
    def from_pretrained(
        cls,
        model_id: str,
        *,
        device: str = "cuda",
        torch_dtype: Any = None,
        variant: str | None = None,
        quantize_int8: bool = False,
        num_inference_steps: int = 4,
        guidance_scale: float = 0.0,
        native_size: tuple[int, int] | None = None,
        **kwargs: Any,
    ) -> "TextToImage":
        """A real model (GPU presets), e.g. a few-step distilled model with guidance 0.

        ``quantize_int8`` stores the denoiser's and text encoders' weights as int8 (optimum-quanto,
        weight-only; activations stay in ``torch_dtype``)."""
        import torch
        from diffusers import AutoPipelineForText2Image

        dtype = torch_dtype if torch_dtype is not None else (torch.float16 if device.startswith("cuda") else torch.float32)
        pipe = AutoPipelineForText2Image.from_pretrained(model_id, torch_dtype=dtype, variant=variant, **kwargs)
        if quantize_int8:
            from magic_demo.quantize import quantize_int8

            for name in ("transformer", "unet", "text_encoder", "text_encoder_2", "text_encoder_3"):
                module = getattr(pipe, name, None)
                if module is not None:
                    quantize_int8(module)
        pipe = pipe.to(device)
        return cls(pipe, model_id=model_id, num_inference_steps=num_inference_steps,
                   guidance_scale=guidance_scale, native_size=native_size)

    @classmethod
    def tiny_random(cls, seed: int = 0, *, num_inference_steps: int = 2, native_size: tuple[int, int] | None = None) -> "TextToImage":
        """A tiny random Stable-Diffusion-style pipeline built from configs (offline; for tests)."""
        import torch
        from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            unet = UNet2DConditionModel(
                sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                attention_head_dim=8, norm_num_groups=8,
            )
            vae = AutoencoderKL(
                in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
                latent_channels=4, norm_num_groups=8, sample_size=64,
            )
            # Character-level CLIP tokenizer from a local vocab (no merges): nothing to download.
            chars = [chr(c) for c in range(33, 127)]
            vocab: dict[str, int] = {}
            for tok in ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]:
                vocab.setdefault(tok, len(vocab))
            tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32)
            text_encoder = CLIPTextModel(CLIPTextConfig(
                vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1,
            ))
        finally:
            torch.random.set_rng_state(gen_state)
        scheduler = EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
            steps_offset=1, timestep_spacing="trailing",
        )
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, model_id=f"tiny-random-sd(seed={seed})", num_inference_steps=num_inference_steps,
                   guidance_scale=0.0, native_size=native_size)

    # ---- generation
    def _vae_multiple(self) -> int:
        factor = getattr(self.pipe, "vae_scale_factor", 8) or 8
        return int(factor) * 2  # latents must also be divisible by the denoiser's downsampling

    def generate(self, prompt: str, seed: int | None, bucket: tuple[int, int]) -> FirstFrame:
        """Generate one image for ``prompt`` and snap it to ``bucket`` (width, height).

        ``seed=None`` draws a random seed; the seed actually used is in the provenance."""
        import torch

        bucket = _check_buckets([bucket])[0]
        if seed is None:
            seed = random.randrange(2**31)
        seed = int(seed)
        if self.native_size is not None:
            gw, gh = self.native_size
        else:
            m = self._vae_multiple()
            gw, gh = (max(m, round(bucket[0] / m) * m), max(m, round(bucket[1] / m) * m))
        device = getattr(self.pipe, "device", None) or "cpu"
        gen_device = "cpu" if str(device).startswith("mps") else device
        generator = torch.Generator(device=gen_device).manual_seed(seed)
        kwargs: dict[str, Any] = dict(
            prompt=prompt, width=gw, height=gh, num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale, generator=generator, output_type="pil",
        )
        if self.negative_prompt is not None:
            kwargs["negative_prompt"] = self.negative_prompt
        out = self.pipe(**kwargs)
        raw = out.images[0]
        if not isinstance(raw, Image.Image):
            raw = Image.fromarray(np.asarray(raw))
        image = fit_to_bucket(raw.convert("RGB"), [bucket])
        provenance = {
            "model_id": self.model_id,
            "prompt": prompt,
            "seed": seed,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "generated_size": list(raw.size),
            "bucket": list(bucket),
        }
        return FirstFrame(image=image, source="generated", provenance=provenance)
