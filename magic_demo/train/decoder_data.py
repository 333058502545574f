"""Data for the decoder trainer (`train/decoder.py`): the latents the miniature denoisers make (4-step I2V windows,
chained as the app chains them, or T2I samples), encoder latents of rendered world clips, and what a decoder should
draw from each: the teacher decoder's pictures, or clean world pictures (`world_targets`)."""
from __future__ import annotations

import time

import numpy as np
import torch
from diffusers import AutoencoderTiny

from magic_demo import world
from magic_demo.autoencoder import decode_raw, encode_raw
from magic_demo.evaluate import AREA_RANGE
from magic_demo.train.vae import make_batch, to_uint8

DATA_SEED = 1_000_000  # far from the evaluators' held-out seeds (10_000 + i, 20_000 + i, 30_000 + i)
HELD_OUT_DATA_SEED = 2_000_000


@torch.inference_mode()
def decoder_frames(vae: AutoencoderTiny, latents: torch.Tensor) -> torch.Tensor:
    """Raw latents [N, C, h, w] -> the VAE's decoded frames [N, 3, H, W] uint8 (teacher targets, student evals)."""
    out = []
    for chunk in latents.split(256):
        x = decode_raw(vae, chunk[:, :, None])[:, :, 0]
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    return torch.cat(out)


@torch.inference_mode()
def encoder_latents(teacher: AutoencoderTiny, clips: int, frames: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder latents of world clips [clips * frames, C, h, w] and the rendered frames [clips * frames, 3, H, W]
    (uint8)."""
    out, pictures = [], []
    for start in range(0, clips, 32):
        x, _, _ = make_batch(range(seed + start, seed + min(clips, start + 32)), frames)
        z = encode_raw(teacher, x)
        out.append(z.permute(0, 2, 1, 3, 4).flatten(0, 1))
        pictures.append(torch.from_numpy(to_uint8(x)).permute(0, 1, 4, 2, 3).flatten(0, 1))
    return torch.cat(out), torch.cat(pictures)


@torch.inference_mode()
def denoised_latents(windows: int, seed: int, preset: str = "mini-x8", num_frames: int = 17, chain: int = 1):
    """Latents of windows denoised by a preset's transformer (its own steps and guidance) from world first frames
    and captions: ([N, C, h, w] raw, the spec of each window). With `chain` > 1 each first frame starts a video of
    that many windows made as the app makes them (prompt encoded once, each later window conditioned on the previous
    window's last frame, decoded with the colour anchor), so later windows' latents are in the data too."""
    from PIL import Image

    from magic_demo.presets import get_preset, load_pipeline

    p = get_preset(preset)
    pipe = load_pipeline(p)
    rng = np.random.default_rng(seed)
    geom = pipe.geometry
    out, specs = [], []
    for i in range(windows):
        spec = world.sample_spec(rng)
        first = world.render_first_frame(spec, size=p.width)
        embeds = pipe.encode_prompt(world.caption(spec), Image.fromarray(first)).select(0)
        image = first
        for k in range(chain):
            cond = pipe.prepare_condition(pipe.encode_image(Image.fromarray(image)), geom.latent_frames(num_frames))
            generator = torch.Generator().manual_seed(seed + i + 7919 * k)
            z = pipe.denoise(cond, embeds, p.steps, generator, p.guidance_scale)
            out.append((z[0] / geom.scaling_factor + geom.shift_factor).permute(1, 0, 2, 3))
            specs.append(spec)
            if k + 1 < chain:
                image = pipe.decode(z, first)[-1].numpy()
    return torch.cat(out), specs


@torch.inference_mode()
def t2i_latents(images: int, seed: int, path: str = "assets/mini/t2i", batch: int = 50):
    """Latents the mini T2I model samples (its shipped steps and guidance) for world captions outside its held-out
    evaluation set: ([N, C, h, w] raw, the captions)."""
    from magic_demo.autoencoder import latent_geometry
    from magic_demo.mini_t2i import HELDOUT_SET, generation_defaults, load_mini_t2i

    pipe, settings = load_mini_t2i(path), generation_defaults(path)
    geom = latent_geometry(pipe.vae)
    rng = np.random.default_rng(seed)
    captions = []
    while len(captions) < images:
        text = world.caption(world.sample_spec(rng))
        if text not in HELDOUT_SET:
            captions.append(text)
    out = []
    for start in range(0, images, batch):
        chunk = captions[start:start + batch]
        final = {}
        pipe(prompt=chunk, generator=[torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))],
             callback_on_step_end=lambda _p, _i, _t, kw: final.update(kw), output_type="pt", **settings)
        out.append(final["latents"] / geom.scaling_factor + geom.shift_factor)
    return torch.cat(out), captions


def spec_for_image(frame: np.ndarray, text: str) -> world.ClipSpec | None:
    """A still spec for a generated image [H, W, 3]: the caption's shape, colour class and background class, with
    the image's background shade, the caption colour at the image's shade and the size of the image's shape (by
    area). None when the image has no shape."""
    words = world.parse_caption(text)
    bg = world.estimate_background(frame)
    found = world.find_shape(frame, bg)
    if found["area"] == 0:
        return None
    base = np.asarray(world.COLOURS[words["colour"]], np.float64)
    rgb = np.clip(found["colour"] @ base / (base @ base), 0.8, 1.0) * base
    area = found["area"] / float(frame.shape[0] * frame.shape[1])
    radius = {"circle": np.sqrt(area / np.pi), "square": np.sqrt(area) / 1.8,
              "triangle": np.sqrt(area / 2)}[words["shape"]]
    return world.ClipSpec(words["shape"], words["colour"], "stays still", words["background"], rgb=tuple(rgb),
                          bg_rgb=tuple(np.round(bg)), radius=float(np.clip(radius, *world.SIZE_RANGE)))


def world_targets(frames: np.ndarray, spec: world.ClipSpec) -> np.ndarray:
    """Clean pictures of what a denoised window shows: the spec's shape (its shade, size, shape class and
    background) drawn wherever the decoded frame [T, H, W, 3] has its shape (moved off the wall where the frame
    edge would cut it); frames without a plausible shape are
    kept as decoded. A decoder trained towards these learns to draw the denoiser's latents, errors included, as
    world pictures (corners, one colour, no stray blobs) instead of as the blobs a plain decoder makes of them."""
    size = frames.shape[2]
    bg, fg = np.asarray(spec.bg_rgb, np.float32), np.asarray(spec.rgb, np.float32)
    out = frames.copy()
    for t, frame in enumerate(frames.astype(np.float32)):
        # the shape's pixels stand out from the background (world.find_shape's mask) and are nearer the spec's
        # colour than the background's, so a stray blob of another colour does not pull the centroid away
        mask = world.find_shape(frame, bg)["mask"] & (
            np.linalg.norm(frame - fg, axis=-1) < np.linalg.norm(frame - bg, axis=-1))
        if not AREA_RANGE[0] <= mask.mean() <= AREA_RANGE[1]:
            continue
        ys, xs = np.nonzero(mask)
        cx, cy = (xs.mean() + 0.5) / size, (ys.mean() + 0.5) / size
        if spec.shape == "triangle":  # its centroid lies a third of the half extent below its box centre
            cy -= spec.radius / 3
        # in the world a shape bounces off the wall whole (`world.trajectory`): a sliver pressed against the frame
        # edge is redrawn as the whole shape touching that wall, not as a shape cut in half by it
        lo, hi = spec.radius, 1.0 - spec.radius
        out[t] = world.render_at(spec, [(np.clip(cx, lo, hi), np.clip(cy, lo, hi))], size)[0]
    return out


def build_data(teacher: AutoencoderTiny, args, seed: int, clips: int, windows: int, say) -> dict:
    """Training pairs. targets "teacher": the teacher decoder's frames of both kinds of latents. targets "world":
    the rendered clip for encoder latents, `world_targets` of the teacher's frames for denoised ones."""
    t = time.time()
    enc, enc_clips = encoder_latents(teacher, clips, args.clip_frames, seed)
    if args.preset == "t2i":  # images of the mini T2I model, one frame each
        den, captions = t2i_latents(windows, seed)
    else:
        den, specs = denoised_latents(windows, seed, args.preset, chain=args.chain)
    den_y = decoder_frames(teacher, den)
    if args.targets == "world":
        enc_y = enc_clips
        count = len(captions) if args.preset == "t2i" else len(specs)
        frames = den_y.permute(0, 2, 3, 1).numpy().reshape(count, -1, *den_y.shape[2:], 3)
        if args.preset == "t2i":
            specs = [spec_for_image(f[0], text) for f, text in zip(frames, captions)]
        den_y = torch.from_numpy(np.concatenate([f if s is None else world_targets(f, s)
                                                 for f, s in zip(frames, specs)]))
        den_y = den_y.permute(0, 3, 1, 2).contiguous()
    else:
        enc_y = decoder_frames(teacher, enc)
    data = {"enc": enc, "enc_y": enc_y, "den": den, "den_y": den_y}
    say(f"built {len(enc)} encoder + {len(den)} denoised latents (seed {seed}, {args.targets} targets) "
        f"in {time.time() - t:.0f}s")
    return data
