"""Train the miniature VAE on clips of the procedural world (CPU, fp32, resumable).

    python -m magic_demo.train.vae --out runs/vae --arch tiny --minutes 600

Data is rendered on the fly from ``magic_demo.world`` (seeded).  Every ``--ckpt-minutes`` the trainer writes
``<out>/ckpt_latest.pt`` (model, optimizer, step, rng states), evaluates on fixed held-out clips (PSNR, colour
error of the shape pixels, colour/motion classes of the reconstruction, per-frame colour/shape kept) and, when
the per-frame colour + shape kept is the best so far, exports the model with ``save_pretrained`` to ``--export`` (default ``assets/mini/vae``) together with
``reconstructions.png`` and ``metrics.json``.  Restarting with the same ``--out`` resumes from the checkpoint.

Architectures (``--arch``): ``tiny`` is a per-frame diffusers ``AutoencoderTiny`` (spatial x8, no temporal
compression), ``tiny-x4`` the same at spatial x4; ``hv*`` are small ``AutoencoderKLHunyuanVideo`` configs
(spatial x8, temporal x4).  The ``test-*`` configs are for unit tests only.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from magic_demo.autoencoder import decode_raw, encode_raw
from magic_demo.evaluate import psnr as frame_psnr
from magic_demo.evaluate import score_clips

from magic_demo import world

ARCHS = {
    # per-frame AutoencoderTiny: 4 blocks, x8 spatial, 16 latent channels
    "tiny": ("AutoencoderTiny", dict(encoder_block_out_channels=(32, 32, 32, 32),
                                     decoder_block_out_channels=(32, 32, 32, 32), latent_channels=16)),
    # the same with 3 blocks: x4 spatial (16x16 latents for 64x64 frames), so corners of small shapes survive;
    # a transformer with patch 2 on it sees as many tokens as patch 1 on the x8 latents
    "tiny-x4": ("AutoencoderTiny", dict(encoder_block_out_channels=(32, 32, 32),
                                        decoder_block_out_channels=(32, 32, 32), latent_channels=16,
                                        num_encoder_blocks=(1, 3, 3), num_decoder_blocks=(3, 3, 1))),
    "tiny64": ("AutoencoderTiny", dict(encoder_block_out_channels=(64, 64, 64, 64),
                                       decoder_block_out_channels=(64, 64, 64, 64), latent_channels=16)),
    "hv": ("AutoencoderKLHunyuanVideo", dict(block_out_channels=(16, 32, 64, 64), layers_per_block=1,
                                             norm_num_groups=4, latent_channels=16)),
    "hv-lpb2": ("AutoencoderKLHunyuanVideo", dict(block_out_channels=(16, 32, 64, 64), layers_per_block=2,
                                                  norm_num_groups=4, latent_channels=16)),
    "hv-wide": ("AutoencoderKLHunyuanVideo", dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1,
                                                  norm_num_groups=1, latent_channels=16)),
    "test-tiny": ("AutoencoderTiny", dict(encoder_block_out_channels=(8, 8, 8, 8),
                                          decoder_block_out_channels=(8, 8, 8, 8), latent_channels=4,
                                          num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1))),
    "test-hv": ("AutoencoderKLHunyuanVideo", dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                                  norm_num_groups=2, latent_channels=4)),
}
HELD_OUT_SEED = 10_000_000  # held-out clips use seeds HELD_OUT_SEED + i; training seeds stay far below


def build_model(arch: str):
    import diffusers
    cls_name, cfg = ARCHS[arch]
    cfg = dict(cfg)
    if cls_name == "AutoencoderKLHunyuanVideo":
        cfg.update(spatial_compression_ratio=8, temporal_compression_ratio=4)
    return getattr(diffusers, cls_name)(**cfg)


def is_per_frame(model) -> bool:
    return model.__class__.__name__ == "AutoencoderTiny"


def prepare_model(model):
    """Training/eval settings: no tiling, no framewise or sliced paths."""
    for name in ("use_tiling", "use_slicing", "use_framewise_encoding", "use_framewise_decoding"):
        if hasattr(model, name):
            setattr(model, name, False)
    return model


# The engine's own unscaled encode/decode (frames folded into the batch for a per-frame autoencoder).
encode, decode = encode_raw, decode_raw


def make_batch(seeds, num_frames, size=64, fps=8):
    """Clips for the given seeds: x [B,3,T,H,W] in [-1,1], shape mask [B,1,T,H,W], and the specs."""
    clips, masks, specs = [], [], []
    for s in seeds:
        spec = world.sample_spec(int(s))
        clip = world.render_clip(spec, num_frames, size, fps).astype(np.float32)
        masks.append(np.linalg.norm(clip - np.asarray(spec.bg_rgb, np.float32), axis=-1) > 10)
        clips.append(clip)
        specs.append(spec)
    x = torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3) / 127.5 - 1
    m = torch.from_numpy(np.stack(masks)).unsqueeze(1).float()
    return x, m, specs


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[B,3,T,H,W] in [-1,1] -> uint8 [B,T,H,W,3]."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 4, 1).numpy()


def frames_for(model, n):
    """Nearest valid clip length (1 + 4k for the temporal VAE)."""
    if is_per_frame(model):
        return n
    r = model.config.temporal_compression_ratio
    return 1 + r * max(0, round((n - 1) / r))


@torch.no_grad()
def evaluate(model, num_clips=16, num_frames=9, size=64, fps=8):
    """Held-out metrics: PSNR, mean colour error of the shape pixels (0..255, L2 in RGB), colour/motion class of
    each clip, and the I2V evaluator's per-frame colour kept / shape kept (the ceiling any latent model can reach)."""
    model.eval()
    num_frames = frames_for(model, num_frames)
    x, _, specs = make_batch([HELD_OUT_SEED + i for i in range(num_clips)], num_frames, size, fps)
    z = encode(model, x)
    y = decode(model, z)[:, :, :num_frames]
    orig, rec = to_uint8(x), to_uint8(y)
    psnr = frame_psnr(orig, rec)
    shape_err, bg_err, colour_ok, motion_ok = [], [], 0, 0
    for o, r, spec in zip(orig, rec, specs):
        core = np.stack([np.linalg.norm(f.astype(np.float32) - spec.bg_rgb, axis=-1) >
                         0.9 * np.linalg.norm(np.subtract(spec.rgb, spec.bg_rgb)) for f in o])
        shape_err.append(np.linalg.norm(r[core].astype(np.float32).mean(0) - o[core].astype(np.float32).mean(0)))
        bgm = ~np.stack([np.linalg.norm(f.astype(np.float32) - spec.bg_rgb, axis=-1) > 3 for f in o])
        bg_err.append(np.linalg.norm(r[bgm].astype(np.float32).mean(0) - o[bgm].astype(np.float32).mean(0)))
        a = world.analyse_clip(r, fps=fps)
        colour_ok += a["colour"] == spec.colour
        motion_ok += a["motion"] == spec.motion
    frames = score_clips(list(rec), specs, fps)
    model.train()
    return {"psnr": psnr, "shape_colour_err": float(np.mean(shape_err)), "bg_colour_err": float(np.mean(bg_err)),
            "colour_acc": colour_ok / num_clips, "motion_acc": motion_ok / num_clips,
            "frame_colour_kept": frames.colour_kept, "frame_shape_kept": frames.shape_kept,
            "latent_std": float(z.std()), "latent_mean": float(z.mean())}


def selection_score(m: dict) -> float:
    """Which checkpoint to export: the per-frame colour + shape kept that the evaluator scores, PSNR breaking ties
    (PSNR alone kept decoders that round squares into circles and shift yellow toward orange)."""
    return m["frame_colour_kept"] + m["frame_shape_kept"] + m["psnr"] / 1000


@torch.no_grad()
def save_grid(model, path, num_clips=4, num_frames=9, show_frames=(0, 2, 4, 6, 8), size=64, fps=8):
    """PNG: for each held-out clip an original row and a reconstruction row of a few frames."""
    from PIL import Image
    model.eval()
    num_frames = frames_for(model, num_frames)
    x, _, _ = make_batch([HELD_OUT_SEED + i for i in range(num_clips)], num_frames, size, fps)
    y = decode(model, encode(model, x))[:, :, :num_frames]
    orig, rec = to_uint8(x), to_uint8(y)
    show = [f for f in show_frames if f < num_frames]
    rows = []
    for o, r in zip(orig, rec):
        rows.append(np.concatenate([o[f] for f in show], axis=1))
        rows.append(np.concatenate([r[f] for f in show], axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
    model.train()


SCALE_CLIPS = 16  # latent std is always measured on the same held-out clips: a frozen encoder keeps its scale


def latent_scale(model, num_clips=SCALE_CLIPS, num_frames=9):
    """scaling_factor so that scaled held-out latents have unit std (and their mean, for shift_factor)."""
    with torch.no_grad():
        model.eval()
        x, _, _ = make_batch([HELD_OUT_SEED + 1000 + i for i in range(num_clips)], frames_for(model, num_frames))
        z = encode(model, x)
        model.train()
    return 1.0 / max(float(z.std()), 1e-6), float(z.mean())


def export(model, export_dir, metrics, arch, step, num_clips=4):
    export_dir = Path(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    scale, mean = latent_scale(model)
    model.register_to_config(scaling_factor=scale)
    model.save_pretrained(export_dir, safe_serialization=True)
    save_grid(model, export_dir / "reconstructions.png", num_clips=min(4, num_clips))
    info = dict(metrics, arch=arch, step=step, scaling_factor=scale, latent_mean=mean,
                per_frame=is_per_frame(model), size=64, fps=8)
    (export_dir / "metrics.json").write_text(json.dumps(info, indent=2) + "\n")


def get_rng_state(data_rng):
    return {"python": random.getstate(), "numpy": data_rng.bit_generator.state, "torch": torch.get_rng_state()}


def set_rng_state(state, data_rng):
    random.setstate(state["python"])
    data_rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"])


def train(args):
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "ckpt_latest.pt"
    log = open(out / "log.txt", "a")

    def say(msg):
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    data_rng = np.random.default_rng(args.seed)
    model = prepare_model(build_model(args.arch))
    if args.freeze_encoder:
        # Keeps the latent space fixed (so a denoiser can train on it) while the decoder keeps improving.
        model.encoder.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    step, best = 0, -1.0
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ck["arch"] != args.arch:
            raise SystemExit(f"{ckpt_path} holds arch {ck['arch']!r}, not {args.arch!r}")
        model.load_state_dict(ck["model"])
        if ck.get("freeze_encoder", False) == args.freeze_encoder:
            opt.load_state_dict(ck["optimizer"])
        else:
            say("trainable parameters changed (--freeze-encoder): starting a fresh optimizer")
        step, best = ck["step"], ck.get("best_score", -1.0)  # older checkpoints ranked by PSNR: re-rank
        set_rng_state(ck["rng"], data_rng)
        say(f"resumed from {ckpt_path} at step {step} (best held-out selection score {best:.3f})")
    elif args.init and (Path(args.init) / "config.json").exists():
        model.load_state_dict(type(model).from_pretrained(args.init).state_dict())
        say(f"initialised weights from {args.init}")
    nparams = sum(p.numel() for p in model.parameters())
    say(f"arch {args.arch} ({model.__class__.__name__}, {nparams / 1e6:.2f}M params), batch {args.batch} x "
        f"{args.frames} frames, lr {args.lr}, shape weight {args.shape_weight}, threads {args.threads}")
    model.train()
    t0 = time.time()
    last_ckpt = t0
    ema = None
    max_frames = frames_for(model, args.frames)
    start_step = step

    def checkpoint():
        nonlocal best
        m = evaluate(model, num_clips=args.eval_clips, num_frames=args.eval_frames)
        say(f"eval step {step}: PSNR {m['psnr']:.2f} dB, shape colour err {m['shape_colour_err']:.1f}, "
            f"bg colour err {m['bg_colour_err']:.1f}, colour acc {m['colour_acc']:.2f}, "
            f"motion acc {m['motion_acc']:.2f}, frame colour kept {m['frame_colour_kept']:.3f}, "
            f"frame shape kept {m['frame_shape_kept']:.3f}, latent std {m['latent_std']:.3f}")
        improved = selection_score(m) > best
        if improved:
            best = selection_score(m)
        tmp = out / "ckpt_latest.pt.tmp"
        torch.save({"arch": args.arch, "model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                    "freeze_encoder": args.freeze_encoder,
                    "best_score": best, "rng": get_rng_state(data_rng), "metrics": m}, tmp)
        os.replace(tmp, ckpt_path)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(dict(m, step=step, time=time.time())) + "\n")
        if improved and args.export:
            export(model, args.export, m, args.arch, step)
            say(f"exported best weights (score {best:.3f}, PSNR {m['psnr']:.2f} dB) to {args.export}")

    while True:
        elapsed = time.time() - t0
        if elapsed > args.minutes * 60 or (args.steps and step >= args.steps):
            break
        T = max_frames
        if not is_per_frame(model) and args.curriculum:
            T = int(data_rng.choice([f for f in (1, 5, 9, 17) if f <= max_frames]))
        seeds = data_rng.integers(0, HELD_OUT_SEED, args.batch)
        x, mask, _ = make_batch(seeds, T)
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.5 ** (step / args.halflife) if args.halflife else 1)
        for g in opt.param_groups:
            g["lr"] = lr
        z = encode(model, x)
        if args.latent_noise:
            # Decoder robustness: a denoiser's latents are never exactly the encoder's, so the decoder also learns
            # to map nearby latents (up to latent_noise x their std) to the clean clip instead of to blotches.
            level = args.latent_noise * z.detach().std() * torch.rand(z.shape[0], *([1] * (z.ndim - 1)))
            z = z + level * torch.randn_like(z)
        y = decode(model, z)[:, :, :T]
        w = 1 + args.shape_weight * mask
        loss = ((y - x) ** 2 * w).sum() / (w.sum() * 3)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        mse = float(((y.detach() - x) ** 2).mean())
        ema = mse if ema is None else 0.98 * ema + 0.02 * mse
        if step % args.log_every == 0:
            say(f"step {step} loss {loss.item():.5f} train PSNR~{10 * math.log10(4 / max(ema, 1e-10)):.2f} dB "
                f"lr {lr:.2e} {(time.time() - t0) / max(1, step - start_step):.2f}s/step")
        if time.time() - last_ckpt > args.ckpt_minutes * 60:
            checkpoint()
            last_ckpt = time.time()
    checkpoint()
    say(f"done at step {step}, best held-out selection score {best:.3f}")
    log.close()
    return step


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/vae", help="checkpoints and logs (resumes from here)")
    p.add_argument("--arch", default="tiny", choices=sorted(ARCHS))
    p.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget of this invocation")
    p.add_argument("--steps", type=int, default=0, help="stop at this total step count (0: no limit)")
    p.add_argument("--export", default="assets/mini/vae", help="best weights go here ('' to skip)")
    p.add_argument("--freeze-encoder", action="store_true",
                   help="train the decoder only (the latent space stays fixed for the denoiser trained on it)")
    p.add_argument("--init", default="", help="start from these exported weights when there is no checkpoint")
    p.add_argument("--batch", type=int, default=8, help="clips per step")
    p.add_argument("--frames", type=int, default=2, help="frames per clip (1+4k for the temporal VAE)")
    p.add_argument("--eval-frames", type=int, default=9)
    p.add_argument("--eval-clips", type=int, default=16, help="held-out clips for evaluation and scaling")
    p.add_argument("--curriculum", action="store_true", help="temporal VAE: mix 1/5/9/17-frame clips")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--halflife", type=float, default=0, help="lr halves every this many steps (0: constant)")
    p.add_argument("--shape-weight", type=float, default=3.0, help="extra loss weight on shape pixels")
    p.add_argument("--latent-noise", type=float, default=0.0,
                   help="train the decoder on latents + noise up to this fraction of their std (robust decoding)")
    p.add_argument("--ckpt-minutes", type=float, default=3.0)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
