"""World-target tuning of the few-step student: its own samples, decoded, pulled toward clean pictures of what
they show.

Neither distillation loss looks at what the app shows: the CFG-distillation loss matches the teacher's velocity at
random noise levels, and the student's 4-step samples come out with squares as rounded blobs and hues that
wander. Here the student's sampler runs with gradients (its Euler steps, one forward each), the frozen decoder
turns the latents into frames, and `world_targets` says what each frame should have been given where the model put
the shape: the spec's shape class, shade, size and background drawn at that place. Motion and placement stay the
model's own; only the appearance is corrected. The loss is a pixel MSE with the shape's pixels (in the target or
in the decoded frame) weighted up, as the background fills ~90% of every frame.

With `chain_windows` part of the batch is made of second windows: conditioned on the student's own (decoded,
colour-anchored) last frame of a first window, as the app's sliding window conditions every later window. One-minute
videos showed why: a 4-step window turns a circle a little square (or a square a little round), the next window
copies that start frame and the shape class is lost from the second window on (shape kept, 20 videos: 69.1% of the
first window's frames, 44.7% of the second's, 38.1% of later ones). Measured in session 17, it did not help yet
(assets/mini_x4/TRAINING.md).

`t2i_world_tune_loss` does the same for the miniature T2I model's samples (its CFG sampler with gradients), with
targets from the caption: the caption's shape and colour class at the sample's own shade, size and place
(`spec_for_image`).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from magic_demo import world
from magic_demo.evaluate import shape_kept
from magic_demo.autoencoder import decode_latents, latent_geometry, video_to_uint8
from magic_demo.sampling import build_sigmas, sample_euler
from magic_demo.train.batches import TrainBatch, encode_batch, velocity, weighted_mse
from magic_demo.train.decoder_data import spec_for_image, world_targets
from magic_demo.windows import match_colours


def sample_with_grad(student, batch: TrainBatch, sigmas: torch.Tensor, guidance: float,
                     generator: torch.Generator) -> torch.Tensor:
    """The student's samples [B, C, t, h, w] for the batch's first frames and prompts, as the pipeline samples
    them (Euler on `sigmas`, guidance input `guidance`), differentiable through every step."""
    noise = torch.randn(batch.x0.shape, generator=generator)
    g = torch.full((len(noise),), float(guidance))
    return sample_euler(lambda x, s: velocity(student, x, s.expand(len(x)), batch, guidance=g), noise, sigmas)


@torch.no_grad()
def next_window_starts(student, vae, batch: TrainBatch, sigmas: torch.Tensor, guidance: float,
                       generator: torch.Generator, references: list[Image.Image]) -> list[Image.Image]:
    """The pictures the student's next windows would start from: the last frame of its samples for the batch,
    decoded and colour-matched to `references` (the videos' first frames), as the app's sliding window with the
    colour anchor conditions window k + 1 on window k."""
    latents = sample_with_grad(student, batch, sigmas, guidance, generator)
    if latent_geometry(vae).temporal_ratio == 1:  # a per-frame VAE decodes the last frame alone
        latents = latents[:, :, -1:]
    frames = decode_latents(vae, latents)[:, :, -1:]
    return [Image.fromarray(match_colours(video_to_uint8(f).numpy()[0], np.asarray(r)))
            for f, r in zip(frames, references)]


def chain_windows(student, pipe, video: torch.Tensor, captions: list[str], firsts: list[Image.Image], rows: int,
                  frames: int, sigmas: torch.Tensor, guidance: float, generator: torch.Generator):
    """Make the first `rows` clips of `video` [B, 3, 2 * frames - 1, H, W] second windows of a sliding window: each
    is conditioned on the student's own last frame of its first window (`next_window_starts`, no gradient), and
    its clean clip is the world's continuation (frames `frames` - 1 onwards). Trained on these, the student learns
    to draw the captioned shape from a start frame with its own errors (a rounded square, a squared circle) instead
    of copying them into every later window. Returns (video [B, 3, frames, H, W], condition images: a picture per
    chained row, None for the others)."""
    first = encode_batch(pipe, video[:rows, :, :frames], captions[:rows], firsts[:rows])
    starts = next_window_starts(student, pipe.vae, first, sigmas, guidance, generator, firsts[:rows])
    video = torch.cat([video[:rows, :, frames - 1:], video[rows:, :, :frames]])
    return video, starts + [None] * (len(firsts) - rows)


def pixel_weights(pictures: np.ndarray, targets: np.ndarray, specs: list[world.ClipSpec],
                  shape_weight: float) -> torch.Tensor:
    """[B, 1, T, H, W]: `shape_weight` on pixels where the decoded frame or its target shows a shape (so stray
    blobs are weighted as much as the shape itself), 1 elsewhere."""
    masks = [[world.find_shape(p, np.asarray(s.bg_rgb, np.float32))["mask"]
              | world.find_shape(t, np.asarray(s.bg_rgb, np.float32))["mask"] for p, t in zip(clip, target)]
             for clip, target, s in zip(pictures, targets, specs)]
    mask = torch.from_numpy(np.asarray(masks, np.float32))[:, None]
    return 1.0 + (shape_weight - 1.0) * mask


def world_tune_loss(student, vae, batch: TrainBatch, specs: list[world.ClipSpec], sigmas: torch.Tensor,
                    guidance: float, generator: torch.Generator, shape_weight: float = 4.0) -> tuple[torch.Tensor, dict]:
    """Pixel MSE between the student's decoded samples and `world_targets` of them (targets computed without
    gradient). `specs` are the clips' specs (shape, shade, size, background). Logs the loss and the fraction of
    frames that had a shape to redraw."""
    frames = decode_latents(vae, sample_with_grad(student, batch, sigmas, guidance, generator))
    return pull_toward_world(frames, specs, shape_weight)


def frames_wrong(pictures: np.ndarray, wanted: list[tuple[str, str]]) -> np.ndarray:
    """Per clip of `pictures` [B, T, H, W, 3] (uint8): the fraction of its frames without a shape of the wanted
    (shape class, colour class), judged as the evaluator judges them (background from frame 0)."""
    out = []
    for clip, (shape, colour) in zip(pictures, wanted):
        bg = world.estimate_background(clip[0])
        found = [world.find_shape(f, bg) for f in clip]
        out.append(np.mean([not (shape_kept(d, f.shape[0] * f.shape[1], shape)
                                 and world.classify_colour(d["colour"]) == colour) for d, f in zip(found, clip)]))
    return np.asarray(out, np.float64)


def pull_toward_world(frames: torch.Tensor, specs: list[world.ClipSpec],
                      shape_weight: float) -> tuple[torch.Tensor, dict]:
    """The world-target loss of decoded samples `frames` [B, 3, T, H, W] in [-1, 1] (with gradients) whose specs
    are `specs`, and its logs (the loss, the fraction of frames redrawn, and `wrong`: `frames_wrong` per sample,
    for `train.focus.FailureFocus`)."""
    pictures = np.stack([video_to_uint8(f.detach()).numpy() for f in frames])  # [B, T, H, W, 3]
    targets = np.stack([world_targets(p, s) for p, s in zip(pictures, specs)])
    redrawn = float(np.mean(np.any(targets != pictures, axis=(2, 3, 4))))
    target = torch.from_numpy(targets).float().permute(0, 4, 1, 2, 3) / 127.5 - 1.0
    loss = weighted_mse(frames, target, pixel_weights(pictures, targets, specs, shape_weight))
    wrong = frames_wrong(pictures, [(s.shape, s.colour) for s in specs])
    return loss, {"loss_world": loss.item(), "redrawn": redrawn, "wrong": wrong}


def t2i_samples_with_grad(pipe, captions: list[str], steps: int, guidance: float,
                          generator: torch.Generator) -> torch.Tensor:
    """The mini T2I pipeline's pictures [B, 3, 1, H, W] in [-1, 1] for `captions`, as it samples them (Euler on its
    own schedule, classifier-free guidance `guidance`), differentiable through every step and the decoder."""
    n, size = len(captions), pipe.default_size
    context, mask = pipe.encode_prompt(captions)
    empty, empty_mask = pipe.encode_prompt([""] * n)
    context, mask = torch.cat([empty, context]), torch.cat([empty_mask, mask])
    sigmas, _ = build_sigmas(pipe.scheduler, steps)

    def guided(x, sigma):
        v_empty, v_text = pipe.velocity(torch.cat([x, x]), sigma * 1000.0, context, mask).chunk(2)
        return v_empty + guidance * (v_text - v_empty)

    latents = sample_euler(guided, pipe.prepare_latents(n, size, size, generator, None, "cpu"), sigmas)
    if pipe.vae is None:  # a pixel-space model's samples are the pictures
        return latents[:, :, None].clamp(-1, 1)
    return decode_latents(pipe.vae, latents[:, :, None])


def t2i_world_tune_loss(pipe, captions: list[str], steps: int, guidance: float, generator: torch.Generator,
                        shape_weight: float = 4.0) -> tuple[torch.Tensor, dict]:
    """Pixel MSE between the mini T2I pipeline's samples for `captions` (`t2i_samples_with_grad`) and
    `world_targets` of them. Samples without a shape give no loss. Logs the loss, the fraction of samples
    redrawn and `wrong` per caption (1 for a sample without a shape)."""
    frames = t2i_samples_with_grad(pipe, captions, steps, guidance, generator)
    pictures = np.stack([video_to_uint8(f.detach()).numpy() for f in frames])  # [B, 1, H, W, 3]
    specs = [spec_for_image(p[0], text) for p, text in zip(pictures, captions)]
    rows = [i for i, s in enumerate(specs) if s is not None]
    wrong = np.ones(len(captions))
    if not rows:
        return frames.sum() * 0.0, {"loss_world": 0.0, "redrawn": 0.0, "wrong": wrong}
    loss, logs = pull_toward_world(frames[rows], [specs[i] for i in rows], shape_weight)
    wrong[rows] = logs["wrong"]
    return loss, {**logs, "wrong": wrong}
