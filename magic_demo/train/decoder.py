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
the shape (`decoder_data.world_targets`). The denoiser draws squares as rounded blobs and adds stray blobs and hue shifts; a
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
from magic_demo.autoencoder import decode_raw
from magic_demo.train.decoder_data import DATA_SEED, HELD_OUT_DATA_SEED, build_data, decoder_frames


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
    p.add_argument("--preset", default="mini-x8", help="the preset whose transformer denoises the training windows, "
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
