"""Train the miniature VAE's decoder on the latents the denoiser makes (CPU, fp32, resumable): distil it into a
narrower, faster one, or teach it to draw those latents as clean world pictures.

    python -m magic_demo train decoder --out runs/decoder12 --channels 12 --batch 48 --total-steps 22000 \
        --minutes 70 --export runs/decoder12/export
    python -m magic_demo train decoder --out runs/dw --targets world --init assets/mini/vae --clips 1000 \
        --windows 1000 --lr 5e-4 --total-steps 10000 --minutes 50 --export runs/dw/export

Decoding was the largest part of a window's cost on CPU (issue 8). The student is an ``AutoencoderTiny`` with
the teacher's encoder (copied and frozen, so the latent space, and every denoiser trained on it, stays the same)
and a narrower decoder trained to reproduce the *teacher decoder's* frames, not the ground truth: the teacher
decoder is forgiving of the denoisers' latent errors (a sharper decoder made generated videos worse, see
assets/mini/vae/TRAINING.md), so the student learns to draw the same pictures from the same latents, including
the latents the shipped 4-step transformer actually produces.

Data, built once and cached in ``<out>/data.pt``: encoder latents of world clips, and latents of 17-frame windows
denoised by the ``mini`` preset from world first frames and captions; targets are the teacher decoder's frames
(uint8). Held-out latents come from other seeds. Every ``--ckpt-minutes`` the trainer evaluates PSNR against the
teacher's frames and how often the colour and shape classes of a frame agree with the teacher's, checkpoints, and
exports the best student (by held-out PSNR on denoised latents) to ``--export`` as a complete VAE folder.

``--targets world`` (with ``--init``, fine-tuning a decoder) replaces the targets: the rendered clips for encoder
latents, and for denoised windows a clean picture of the window's spec drawn wherever the teacher's frame shows
the shape (`world_targets`). The denoiser draws squares as rounded blobs and adds stray blobs and hue shifts; a
decoder fitted to encoder latents renders those errors faithfully, this one learns to draw them as the world's
shapes. The best student is then the one whose frames most often have the target's colour and shape class.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderTiny

from magic_demo import world
from magic_demo.autoencoder import decode_raw, encode_raw
from magic_demo.train.vae import make_batch

DATA_SEED = 1_000_000  # far from the evaluators' held-out seeds (10_000 + i, 20_000 + i, 30_000 + i)
HELD_OUT_DATA_SEED = 2_000_000


def student_from_teacher(teacher: AutoencoderTiny, channels: int, blocks: tuple[int, ...]) -> AutoencoderTiny:
    """Same encoder (weights copied, frozen), narrower decoder, same latent scaling."""
    cfg = dict(teacher.config)
    cfg.update(decoder_block_out_channels=(channels,) * len(cfg["decoder_block_out_channels"]),
               num_decoder_blocks=tuple(blocks))
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_") and k != "block_out_channels"}
    student = AutoencoderTiny(**cfg)
    student.encoder.load_state_dict(teacher.encoder.state_dict())
    student.encoder.requires_grad_(False)
    return student


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
        pictures.append(((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 1, 3, 4).flatten(0, 1))
    return torch.cat(out), torch.cat(pictures)


@torch.inference_mode()
def denoised_latents(windows: int, seed: int, preset: str = "mini", num_frames: int = 17, chain: int = 1):
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
    background) drawn wherever the decoded frame [T, H, W, 3] has its shape; frames without a plausible shape are
    kept as decoded. A decoder trained towards these learns to draw the denoiser's latents, errors included, as
    world pictures (corners, one colour, no stray blobs) instead of as the blobs a plain decoder makes of them."""
    from magic_demo.evaluate import AREA_RANGE

    size = frames.shape[2]
    bg, fg = np.asarray(spec.bg_rgb, np.float32), np.asarray(spec.rgb, np.float32)
    out = frames.copy()
    for t, frame in enumerate(frames.astype(np.float32)):
        to_bg = np.linalg.norm(frame - bg, axis=-1)
        # the shape's pixels stand out from the background (as world.find_shape's) and are nearer the spec's
        # colour than the background's, so a stray blob of another colour does not pull the centroid away
        mask = (to_bg > 40) & (np.linalg.norm(frame - fg, axis=-1) < to_bg)
        if not AREA_RANGE[0] <= mask.mean() <= AREA_RANGE[1]:
            continue
        ys, xs = np.nonzero(mask)
        cx, cy = (xs.mean() + 0.5) / size, (ys.mean() + 0.5) / size
        if spec.shape == "triangle":  # its centroid lies a third of the half extent below its box centre
            cy -= spec.radius / 3
        out[t] = world.render_at(spec, [(cx, cy)], size)[0]
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


def frame_weights(y: torch.Tensor, shape_weight: float) -> torch.Tensor:
    """1 on the background, 1 + shape_weight where a pixel differs from the frame's median colour (the shape)."""
    bg = y.flatten(2).median(dim=2).values[:, :, None, None]
    return 1 + shape_weight * ((y - bg).abs().amax(1, keepdim=True) > 10 / 127.5).float()


def frame_classes(frame: np.ndarray) -> tuple | None:
    """(colour, shape) of the shape found in a frame, None when there is none."""
    found = world.find_shape(frame)
    if found["area"] == 0:
        return None
    return world.classify_colour(found["colour"]), world.classify_shape(found["mask"])


@torch.no_grad()
def evaluate(student: AutoencoderTiny, held: dict) -> dict:
    student.eval()
    m = {}
    for name in ("enc", "den"):
        y = decoder_frames(student, held[name]).float()
        t = held[f"{name}_y"].float()
        mse = float(((y - t) ** 2).mean())
        m[f"{name}_psnr"] = 10 * math.log10(255 ** 2 / max(mse, 1e-10))
        m[f"{name}_mean_abs"] = float((y - t).abs().mean())
        agree = []
        for a, b in zip(y.byte().permute(0, 2, 3, 1).numpy(), t.byte().permute(0, 2, 3, 1).numpy()):
            agree.append(frame_classes(a) == frame_classes(b))
        m[f"{name}_class_agree"] = float(np.mean(agree))
    student.train()
    return m


def train(args) -> int:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "log.txt", "a")

    def say(msg):
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    if args.targets == "world" and args.latent_noise:
        raise SystemExit("--latent-noise draws its targets with the teacher; it cannot be used with --targets world")
    # teacher targets: agree with the teacher's pictures; world targets: draw the right colour and shape class
    selection = "den_class_agree" if args.targets == "world" else "den_psnr"
    teacher = AutoencoderTiny.from_pretrained(args.teacher).eval()
    data_path = out / "data.pt"
    if data_path.exists():
        cached = torch.load(data_path, weights_only=True)
        train_data, held = cached["train"], cached["held"]
    else:
        train_data = build_data(teacher, args, DATA_SEED, args.clips, args.windows, say)
        held = build_data(teacher, args, HELD_OUT_DATA_SEED, 32, args.held_windows, say)
        torch.save({"train": train_data, "held": held}, data_path)
    lat = torch.cat([train_data["enc"], train_data["den"]])
    tgt = torch.cat([train_data["enc_y"], train_data["den_y"]])

    blocks = tuple(int(b) for b in args.blocks.split(","))
    student = student_from_teacher(teacher, args.channels, blocks).to(memory_format=torch.channels_last)
    if args.init:  # fine-tune an existing decoder of the same width (its encoder must be the teacher's)
        student.decoder.load_state_dict(AutoencoderTiny.from_pretrained(args.init).decoder.state_dict())
    params = [p for p in student.decoder.parameters()]
    opt = torch.optim.Adam(params, lr=args.lr)
    step, best = 0, -1.0
    ckpt_path = out / "ckpt_latest.pt"
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if (ck["channels"], tuple(ck["blocks"])) != (args.channels, blocks):
            raise SystemExit(f"{ckpt_path} holds a {ck['channels']}-channel {ck['blocks']} decoder")
        student.decoder.load_state_dict(ck["decoder"])
        opt.load_state_dict(ck["optimizer"])
        step, best = ck["step"], ck["best"]
        say(f"resumed at step {step} (best held-out {selection} {best:.3f})")
    say(f"student decoder: {args.channels} channels, blocks {blocks}, {sum(p.numel() for p in params) / 1e3:.0f}k "
        f"params; {len(lat)} training latents; batch {args.batch}, lr {args.lr}, threads {args.threads}")
    gen = torch.Generator().manual_seed(args.seed + step)

    def checkpoint():
        nonlocal best
        m = evaluate(student, held)
        say(f"eval step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()))
        score = m[selection]
        improved = score > best
        best = max(best, score)
        tmp = out / "ckpt_latest.pt.tmp"
        torch.save({"decoder": student.decoder.state_dict(), "optimizer": opt.state_dict(), "step": step,
                    "best": best, "channels": args.channels, "blocks": list(blocks)}, tmp)
        os.replace(tmp, ckpt_path)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(dict(m, step=step, time=time.time())) + "\n")
        if improved and args.export:
            student.save_pretrained(args.export, safe_serialization=True)
            Path(args.export, "metrics.json").write_text(json.dumps(dict(
                m, step=step, teacher=args.teacher, channels=args.channels, blocks=list(blocks), targets=args.targets,
                init=args.init, latents_from=args.preset), indent=1))
            say(f"exported (held-out {selection} {best:.3f}) to {args.export}")

    t0 = last = time.time()
    start, ema = step, None
    student.train()
    while time.time() - t0 < args.minutes * 60 and not (args.steps and step >= args.steps):
        idx = torch.randint(0, len(lat), (args.batch,), generator=gen)
        z = lat[idx]
        y_t = tgt[idx].float() / 127.5 - 1
        if args.latent_noise:  # nearby latents should draw nearby pictures, as the teacher's do
            z = z + args.latent_noise * z.std() * torch.rand(len(z), 1, 1, 1, generator=gen) * torch.randn(
                z.shape, generator=gen)
            with torch.no_grad():
                y_t = decode_raw(teacher, z[:, :, None])[:, :, 0].clamp(-1, 1)
        lr = args.lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / args.total_steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        y = decode_raw(student, z[:, :, None])[:, :, 0]
        w = frame_weights(y_t, args.shape_weight)
        loss = (((y - y_t) ** 2) * w).sum() / (w.sum() * 3)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % args.log_every == 0:
            say(f"step {step} loss {ema:.5f} lr {lr:.2e} {(time.time() - t0) / (step - start):.2f}s/step")
        if time.time() - last > args.ckpt_minutes * 60:
            checkpoint()
            last = time.time()
    checkpoint()
    say(f"done at step {step}, best held-out {selection} {best:.3f}")
    log.close()
    return step


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/decoder", help="data cache, checkpoints and logs (resumes from here)")
    # The full-width VAE: its encoder is the one every miniature model was trained with; assets/mini/vae holds the
    # distilled decoder. Its decoder is the T2I model's, fine-tuned on T2I samples in session 11 (the original, that
    # the 12-channel decoder was distilled from, is in git history up to commit c1b4ff9).
    p.add_argument("--teacher", default="assets/mini/t2i/vae")
    p.add_argument("--export", default="", help="best student VAE folder ('' to skip)")
    p.add_argument("--init", default="", help="start from this VAE folder's decoder (same width; '' = fresh)")
    p.add_argument("--targets", choices=("teacher", "world"), default="teacher",
                   help="teacher: the teacher decoder's frames; world: clean world pictures (see world_targets)")
    p.add_argument("--preset", default="mini", help="the preset whose transformer denoises the training windows, "
                                                     "or t2i: images of the mini T2I model (--windows of them)")
    p.add_argument("--channels", type=int, default=12)
    p.add_argument("--blocks", default="3,3,3,1", help="decoder blocks per level (low to high resolution)")
    p.add_argument("--clips", type=int, default=1200, help="world clips encoded for training")
    p.add_argument("--clip-frames", type=int, default=9)
    p.add_argument("--windows", type=int, default=600, help="denoised 17-frame windows for training")
    p.add_argument("--chain", type=int, default=1, help="windows per video for the denoised data (>1: later "
                                                         "windows conditioned on the previous window's last frame)")
    p.add_argument("--held-windows", type=int, default=24, help="held-out denoised windows (eval, selection)")
    p.add_argument("--batch", type=int, default=32, help="frames per step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--total-steps", type=int, default=20000, help="length of the cosine lr schedule")
    p.add_argument("--shape-weight", type=float, default=4.0)
    p.add_argument("--latent-noise", type=float, default=0.0, help="extra noise on latents (x their std), "
                                                                     "targets decoded by the teacher")
    p.add_argument("--minutes", type=float, default=60.0)
    p.add_argument("--steps", type=int, default=0, help="stop at this total step count (0: no limit)")
    p.add_argument("--ckpt-minutes", type=float, default=4.0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
