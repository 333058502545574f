"""Training batches from the procedural world, encoded exactly as the pipeline conditions the transformer.

Shared by the teacher trainer and the distillation recipes (CFG distillation, DMD2).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from magic_demo import world
from magic_demo.autoencoder import encode_video
from magic_demo.pipeline import neutral_image


@dataclass
class TrainBatch:
    x0: torch.Tensor  # clean latents [B, C, T, h, w]
    cond: torch.Tensor  # [image latent in frame 0 ; mask] [B, C+1, T, h, w]
    embeds: torch.Tensor  # [B, L, D] image tokens + text tokens
    mask: torch.Tensor  # [B, L]
    pooled: torch.Tensor  # [B, D2]

    def with_text(self, embeds: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor) -> "TrainBatch":
        return TrainBatch(self.x0, self.cond, embeds, mask, pooled)

    def rows(self, index: slice) -> "TrainBatch":
        return TrainBatch(self.x0[index], self.cond[index], self.embeds[index], self.mask[index], self.pooled[index])


def edge_start_sampler(fraction: float, bounce_within: float = 1.0) -> Callable[[np.random.Generator], world.ClipSpec]:
    """A spec sampler that draws `fraction` of its clips with the shape reaching the wall it moves toward within
    `bounce_within` seconds (`world.sample_spec(bounce_within=...)`), the rest as `world.sample_spec` does. Plain
    clips never start there, but a sliding window's later windows do: the captioned motion pushes the shape into
    the wall, and a model that never saw it breaks the shape up there. A fraction of 0 gives `world.sample_spec`
    itself, so the clips (and the rng stream) are those of a run without edge starts."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    if fraction == 0:
        return world.sample_spec

    def draw(rng: np.random.Generator) -> world.ClipSpec:
        return world.sample_spec(rng, bounce_within=bounce_within if rng.random() < fraction else None)

    return draw


def step_specs(step: int, batch: int, seed: int,
               draw_spec: Callable[[np.random.Generator], world.ClipSpec] = world.sample_spec) -> list[world.ClipSpec]:
    """The specs of a step's clips: the same `sample_clips` renders (it draws them first from the same rng)."""
    rng = np.random.default_rng([seed, step])
    return [draw_spec(rng) for _ in range(batch)]


def sample_clips(step: int, batch: int, frames: int, size: int, fps: int, seed: int, dropout: float,
                 draw_spec: Callable[[np.random.Generator], world.ClipSpec] = world.sample_spec):
    """(video [B, 3, T, H, W] in [-1, 1], captions with `dropout` of them emptied, first frames) for a step;
    `draw_spec` draws each clip's spec from the step's rng (`train.focus.FailureFocus.draw` to focus)."""
    rng = np.random.default_rng([seed, step])
    specs = [draw_spec(rng) for _ in range(batch)]
    clips = np.stack([world.render_clip(s, frames, size, fps) for s in specs])  # [B, T, H, W, 3]
    captions = [world.caption(s) if rng.random() >= dropout else "" for s in specs]
    firsts = [Image.fromarray(c[0]) for c in clips]
    video = torch.from_numpy(clips).float().permute(0, 4, 1, 2, 3) / 127.5 - 1.0
    return video, captions, firsts


def shape_loss_weights(video: torch.Tensor, latent_shape: Sequence[int],
                       shape_weight: float) -> Optional[torch.Tensor]:
    """Per-latent-pixel loss weights [B, 1, t, h, w]: `shape_weight` where a latent pixel covers part of the shape,
    1 elsewhere; None for a weight of 1 (plain MSE, `weighted_mse`). The shape is found as the evaluator finds it
    (`world.find_shape`, against the background of the clip's frame 0); a latent pixel counts if any pixel it
    covers does. The background fills ~90% of a frame and
    is easy, so a plain mean spends most of the loss on it."""
    if shape_weight == 1:
        return None
    frames = ((video.permute(0, 2, 3, 4, 1) + 1.0) * 127.5).numpy()  # [B, T, H, W, 3]
    masks = [[world.find_shape(f, world.estimate_background(clip[0]))["mask"] for f in clip] for clip in frames]
    mask = torch.from_numpy(np.asarray(masks, np.float32))[:, None]  # [B, 1, T, H, W]
    covered = torch.nn.functional.adaptive_max_pool3d(mask, tuple(latent_shape[-3:]))
    return 1.0 + (shape_weight - 1.0) * covered


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean squared error with per-position weights broadcast over channels (normalised: weights 1 = plain MSE)."""
    if weights is None:
        return torch.nn.functional.mse_loss(pred, target)
    weights = weights.expand_as(pred)
    return (weights * (pred - target) ** 2).sum() / weights.sum()


def noise_condition(batch: TrainBatch, max_sigma: float, generator: torch.Generator,
                    prob: float = 0.5) -> TrainBatch:
    """The batch with Gaussian noise on its conditioning image latents: each image-conditioned row, with
    probability `prob`, gets noise of std ~ U(0, max_sigma) (the clean latents and the target are untouched).
    Windows after the first are conditioned on a frame the model made, whose latent carries the model's errors;
    the aim is a model that makes a clean clip from them instead of copying the errors forward (Stable Video
    Diffusion noises its conditioning frame for a related reason). Measured on the miniature, it did not help
    (README, honest state). Text-only rows stay zero."""
    if max_sigma <= 0:
        return batch
    c = batch.x0.shape[1]
    n = len(batch.x0)
    has_image = batch.cond[:, c, 0].flatten(1).amax(1) > 0  # the mask channel marks frame 0 as given
    picked = (torch.rand(n, generator=generator) < prob) & has_image
    sigma = max_sigma * torch.rand(n, generator=generator) * picked
    noise = torch.randn(batch.cond[:, :c, :1].shape, generator=generator)
    cond = batch.cond.clone()
    cond[:, :c, :1] += sigma.view(-1, 1, 1, 1, 1) * noise
    return dataclasses.replace(batch, cond=cond)


@torch.no_grad()
def encode_batch(pipe, video: torch.Tensor, captions: list[str], firsts: list[Image.Image],
                 text_only: Optional[Sequence[bool]] = None,
                 condition_images: Optional[Sequence[Optional[Image.Image]]] = None) -> TrainBatch:
    """Latents, conditioning and text embeddings (cloned out of inference mode so autograd may use them).
    Rows flagged `text_only` are text-to-video: image latent and mask zeroed, the VLM shown `neutral_image`.
    A row with a `condition_images` entry is conditioned on that picture instead of its clip's frame 0, while the
    VLM still sees `firsts`: a sliding window's later windows (the previous window's last frame in the latent
    concat, the video's first frame in the image tokens)."""
    text_only = list(text_only) if text_only is not None else [False] * len(firsts)
    x0 = encode_video(pipe.vae, video)
    emb = pipe.encode_prompt(captions, [neutral_image(f.size) if t else f for f, t in zip(firsts, text_only)])
    image_latents = x0[:, :, :1]
    if condition_images is not None:
        image_latents = torch.cat([x0[i:i + 1, :, :1] if image is None else pipe.encode_image(image)
                                   for i, image in enumerate(condition_images)])
    cond = pipe.prepare_condition(image_latents, x0.shape[2])
    cond[torch.tensor(text_only, dtype=torch.bool)] = 0
    return TrainBatch(x0.clone(), cond.clone(), emb.embeds.clone(), emb.mask.clone(), emb.pooled.clone())


def velocity(model, x: torch.Tensor, sigma: torch.Tensor, batch: TrainBatch,
             guidance: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The transformer's velocity at noise level `sigma` [B] (timestep = 1000 sigma), with the pipeline's inputs."""
    kwargs = {}
    if getattr(model.config, "guidance_embeds", False):
        g = guidance if guidance is not None else torch.zeros(len(x))
        kwargs["guidance"] = g.to(x.dtype) * 1000.0
    return model(hidden_states=torch.cat([x, batch.cond], 1), timestep=sigma.to(x.dtype) * 1000.0,
                 encoder_hidden_states=batch.embeds, encoder_attention_mask=batch.mask,
                 pooled_projections=batch.pooled, return_dict=False, **kwargs)[0]


def noise_levels(n: int, generator: torch.Generator, shift: float = 3.0) -> torch.Tensor:
    """Training noise levels: uniform, shifted toward high noise (inference samples with shift 5, 4 steps)."""
    u = torch.rand(n, generator=generator)
    return shift * u / (1 + (shift - 1) * u)
