"""Train the miniature text-to-image first-frame model (pixel-space rectified flow, 64x64) on CPU.

    python -m magic_demo.train.t2i --out runs/t2i --minutes 45

* Data: first frames of random world specs rendered on the fly (deterministic per step, so a resumed run sees the
  same stream); the 64 held-out evaluation captions (``mini_t2i.heldout_captions``) are never used.
* Loss: rectified flow, x_t = (1 - s) x0 + s n, target velocity n - x0, MSE weighted up on the shape's pixels
  (they are ~6% of the frame and carry colour and shape); s drawn half uniform, half shifted logit-normal.
  With a config naming a ``vae`` (the miniature world's frozen autoencoder) x0 are its latents of the frame and
  the weights the shape mask max-pooled to the latent grid.
  ~10% of captions are dropped to "" so classifier-free guidance works at inference.
* Transformer and CLIP text encoder are trained jointly (AdamW, warm-up), with an EMA of both that is what gets
  evaluated and exported.
* Resumable: ``<out>/checkpoint.pt`` (weights, EMA, optimiser, step, training seconds) every ``--ckpt-minutes``;
  ``--init <export folder>`` starts from shipped weights when there is no checkpoint.
* ``--world-weight W`` adds W times the world-target loss on the model's own samples (``--world-steps`` Euler
  steps at CFG ``--world-guidance``, differentiable; ``distill/world_tune.py``) for ``--world-batch`` captions of
  each step: pixels of the decoded samples pulled toward the caption's shape and colour drawn where the sample put
  its shape. ``--world-focus`` draws those captions separately instead, more often for the (shape, colour,
  background) groups the model's recent samples got wrong (``train/focus.py``); ``--decoder-lr`` trains the
  model's own decoder (``<export>/vae``, used by nothing else; the encoder, i.e. the latent space, stays frozen)
  with that loss too, so denoiser and decoder can agree on latents that show corners.
* Every ``--eval-minutes`` the EMA model is scored on 50 held-out captions; the best (colour+shape, then
  background) is exported as safetensors + configs to ``--export`` with ``train_state.json`` and
  ``generation.json`` (the steps / guidance it was measured with).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderTiny

from magic_demo import world
from magic_demo.distill.world_tune import t2i_world_tune_loss
from magic_demo.mini_t2i import (GENERATION_FILE, HELDOUT_SET, MiniT2IPipeline, build_mini_t2i, denoise,
                                 evaluate_t2i, load_mini_t2i)
from magic_demo.train.focus import FailureFocus
from magic_demo.train.i2v import transfer_matching

CONFIGS = {
    # latent space of the world's VAE: 16 x 8 x 8 latents, one token per latent pixel (64 tokens)
    "latent": {"arch": "pixart", "heads": 4, "head_dim": 32, "layers": 6, "patch": 1, "text_hidden": 64,
               "text_layers": 2, "vae": "assets/mini/vae"},
    # the x4 VAE's 16 x 16 x 16 latents, patch 2: the same 8 x 8 token grid, so `init_blocks` can lend "latent"'s blocks
    "latent-x4": {"arch": "pixart", "heads": 4, "head_dim": 32, "layers": 6, "patch": 2, "text_hidden": 64,
                  "text_layers": 2, "vae": "assets/mini_x4/vae"},
    # conv UNet (pixel space, attention at 8x8 only): learns crisp shapes in far fewer steps than the transformer
    "unet": {"arch": "unet", "channels": (32, 64, 96, 128), "text_hidden": 64, "text_layers": 2},
    # 1.2M-param PixArt transformer (4 heads x 32, 4 layers, patch 4) + 0.1M CLIP text
    "small": {"arch": "pixart", "heads": 4, "head_dim": 32, "layers": 4, "patch": 4, "text_hidden": 64, "text_layers": 2},
    # tests: a few thousand parameters
    "tiny": {"heads": 2, "head_dim": 8, "layers": 1, "patch": 8, "text_hidden": 16, "text_layers": 1},
}
CHECKPOINT = "checkpoint.pt"


def make_batch(step: int, batch: int, seed: int = 0, size: int = 64, drop: float = 0.1):
    """(images [B,3,H,W] in [-1,1], shape-pixel weights [B,1,H,W], captions with ~drop of them empty)."""
    rng = np.random.default_rng([seed, step])
    imgs, masks, caps = [], [], []
    while len(caps) < batch:
        spec = world.sample_spec(rng)
        cap = world.caption(spec)
        if cap in HELDOUT_SET:
            continue
        frame = world.render_first_frame(spec, size=size).astype(np.float32)
        masks.append(np.abs(frame - np.asarray(spec.bg_rgb, np.float32)).sum(-1) > 10)
        imgs.append(frame / 127.5 - 1.0)
        caps.append("" if rng.random() < drop else cap)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    m = torch.from_numpy(np.stack(masks)).float()[:, None]
    return x, m, caps


def sample_sigmas(n: int, gen: torch.Generator, shift: float) -> torch.Tensor:
    u = torch.rand(n, generator=gen)
    ln = torch.sigmoid(torch.randn(n, generator=gen))
    ln = shift * ln / (1 + (shift - 1) * ln)
    s = torch.where(torch.rand(n, generator=gen) < 0.5, u, ln)
    return s.clamp(1e-3, 1.0)


def flow_loss(pipe: MiniT2IPipeline, x0, weights, caps, gen, shift: float, shape_weight: float):
    tok = pipe.tokenizer(caps, padding="max_length", max_length=pipe.max_tokens, truncation=True, return_tensors="pt")
    ctx = pipe.text_encoder(tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
    with torch.no_grad():
        x0 = pipe.encode_images(x0)
    weights = F.adaptive_max_pool2d(weights, x0.shape[-2:])
    s = sample_sigmas(x0.shape[0], gen, shift)
    noise = torch.randn(x0.shape, generator=gen)
    xt = (1 - s[:, None, None, None]) * x0 + s[:, None, None, None] * noise
    v = denoise(pipe, xt, s * 1000, ctx, tok.attention_mask)
    w = 1.0 + shape_weight * weights
    return ((v - (noise - x0)) ** 2 * w).mean() / w.mean()


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float):
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1 - decay)


def export(pipe: MiniT2IPipeline, folder: Path, state: dict, generation: dict):
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    (folder / "train_state.json").write_text(json.dumps(state, indent=2) + "\n")
    (folder / GENERATION_FILE).write_text(json.dumps(generation, indent=2) + "\n")


def _score(r):
    return (r["colour_and_shape"], r["background"])


def train(out="runs/t2i", minutes=45.0, max_steps=None, config="small", batch=24, lr=6e-4, warmup=100,
          shift=3.0, shape_weight=4.0, drop=0.1, ema_decay=0.999, ckpt_minutes=3.0, eval_minutes=5.0,
          eval_n=50, eval_steps=(8,), eval_guidance=(1.0, 2.0), export_dir=None, init=None, seed=0, threads=1,
          world_weight=0.0, world_batch=16, world_steps=8, world_guidance=4.0, world_focus=False, decoder_lr=0.0,
          init_blocks=None, log=print):
    """Train for ``minutes`` of wall time (or ``max_steps`` in total); returns the final state dict.

    ``init_blocks``: an exported model for another latent space whose denoiser lends every tensor of matching name
    and shape (the transformer blocks, caption and time embedders) and whose text encoder is copied whole; the
    layers that read and write latents start fresh (``transfer_matching``)."""
    torch.set_num_threads(int(threads))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT
    if init is not None and init_blocks is not None:
        raise ValueError(f"`init` and `init_blocks` exclude each other, got {init!r} and {init_blocks!r}")
    model_cfg = CONFIGS[config] if isinstance(config, str) else dict(config)
    vae_path = model_cfg.get("vae")
    if vae_path and init is not None and (Path(init) / "vae" / "config.json").is_file():
        vae_path = Path(init) / "vae"  # the shipped model's own decoder (fine-tuned on its samples), same encoder
    vae = AutoencoderTiny.from_pretrained(vae_path) if vae_path else None
    pipe = build_mini_t2i(model_cfg, shift=shift, seed=seed, vae=vae)
    state = {"step": 0, "train_seconds": 0.0, "config": model_cfg, "best": None, "evals": []}
    focus = FailureFocus() if world_focus else None
    if decoder_lr and (not world_weight or vae is None):
        raise ValueError(f"`decoder_lr` needs a latent model and the world-target loss (the only loss that reaches the "
                         f"decoder), got world_weight={world_weight!r} and config vae={vae_path!r}")
    trained = [pipe.denoiser, pipe.text_encoder] + ([pipe.vae.decoder] if decoder_lr else [])
    if pipe.vae is not None:
        pipe.vae.requires_grad_(False)
        pipe.vae.decoder.requires_grad_(bool(decoder_lr))  # the encoder (the latent space) always stays frozen
    params = [p for m in trained for p in m.parameters()]
    groups = [{"params": list(pipe.denoiser.parameters()) + list(pipe.text_encoder.parameters())}]
    base_lrs = [lr]
    if decoder_lr:
        groups.append({"params": list(pipe.vae.decoder.parameters())})
        base_lrs.append(decoder_lr)
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    ema_sd = None  # the weight average to resume, only from a checkpoint
    if ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        pipe.denoiser.load_state_dict(ck.get("denoiser", ck.get("transformer")))
        pipe.text_encoder.load_state_dict(ck["text_encoder"])
        if "decoder" in ck:
            pipe.vae.decoder.load_state_dict(ck["decoder"])
        opt.load_state_dict(ck["optimizer"])
        state = ck["state"]
        ema_sd = ck["ema"]
        if focus is not None and "focus" in state:
            focus.load_state_dict(state["focus"])
        log(f"resumed from {ckpt_path} at step {state['step']} ({state['train_seconds'] / 60:.1f} min trained)")
    elif init is not None and (Path(init) / "model_index.json").is_file():
        shipped = load_mini_t2i(init)
        pipe.denoiser.load_state_dict(shipped.denoiser.state_dict())
        pipe.text_encoder.load_state_dict(shipped.text_encoder.state_dict())
        f = Path(init) / "train_state.json"
        if f.is_file():
            prev = json.loads(f.read_text())
            state.update(step=int(prev.get("step", 0)), train_seconds=float(prev.get("train_seconds", 0.0)))
        log(f"initialised from shipped weights {init} (step {state['step']})")
    elif init_blocks is not None:
        source = load_mini_t2i(init_blocks)
        copied, fresh = transfer_matching(pipe.denoiser, source.denoiser)
        pipe.text_encoder.load_state_dict(source.text_encoder.state_dict())
        log(f"blocks from {init_blocks}: {copied} tensors copied, fresh: {', '.join(fresh)}; text encoder copied")
    ema = copy.deepcopy(pipe)  # EMA of transformer + text encoder; shares tokenizer and scheduler config
    if ema_sd is not None:
        ema.denoiser.load_state_dict(ema_sd.get("denoiser", ema_sd.get("transformer")))
        ema.text_encoder.load_state_dict(ema_sd["text_encoder"])
        if "decoder" in ema_sd:
            ema.vae.decoder.load_state_dict(ema_sd["decoder"])
    pipe.denoiser.train()
    pipe.text_encoder.train()
    ema.denoiser.eval()
    ema.text_encoder.eval()
    n_params = sum(p.numel() for p in params)
    log(f"mini T2I: {n_params / 1e6:.2f}M trainable parameters, batch {batch}, config {model_cfg}")

    def save_checkpoint():
        tmp = ckpt_path.with_suffix(".tmp")
        ck = {"denoiser": pipe.denoiser.state_dict(), "text_encoder": pipe.text_encoder.state_dict(),
              "ema": {"denoiser": ema.denoiser.state_dict(), "text_encoder": ema.text_encoder.state_dict()},
              "optimizer": opt.state_dict(), "state": state}
        if decoder_lr:
            ck["decoder"], ck["ema"]["decoder"] = pipe.vae.decoder.state_dict(), ema.vae.decoder.state_dict()
        torch.save(ck, tmp)
        os.replace(tmp, ckpt_path)

    def run_eval():
        results = []
        for st in eval_steps:
            for g in eval_guidance:
                r = evaluate_t2i(ema, n=eval_n, seed=0, num_inference_steps=st, guidance_scale=g)
                r.pop("rows")
                results.append(r)
        best = max(results, key=_score)
        entry = {"step": state["step"], "train_minutes": round(state["train_seconds"] / 60, 2),
                 "results": [{k: r[k] for k in ("num_inference_steps", "guidance_scale", "colour", "shape",
                                                "background", "colour_and_shape")} for r in results]}
        state["evals"].append(entry)
        log("eval " + json.dumps(entry))
        if export_dir is not None and (state["best"] is None or _score(best) >= tuple(state["best"]["score"])):
            state["best"] = {"step": state["step"], "score": list(_score(best)),
                             "colour": best["colour"], "shape": best["shape"], "background": best["background"]}
            gen = {"num_inference_steps": best["num_inference_steps"], "guidance_scale": best["guidance_scale"]}
            exp_state = {"step": state["step"], "train_seconds": round(state["train_seconds"], 1),
                         "config": model_cfg, "batch": batch, "lr": lr, "shift": shift, "eval_n": eval_n,
                         "accuracy": {k: best[k] for k in ("colour", "shape", "background", "colour_and_shape")},
                         **gen}
            export(ema, Path(export_dir), exp_state, gen)
            log(f"exported step {state['step']} to {export_dir}")
        return best

    gen = torch.Generator().manual_seed(seed * 7919 + state["step"])
    t_start = time.time()
    last_ckpt = last_eval = time.time()
    deadline = t_start + minutes * 60
    losses = []
    while time.time() < deadline and (max_steps is None or state["step"] < max_steps):
        t0 = time.time()
        step = state["step"]
        for g, base_lr in zip(opt.param_groups, base_lrs):
            g["lr"] = base_lr * min(1.0, (step + 1) / warmup)
        x0, m, caps = make_batch(step, batch, seed=seed, size=pipe.default_size, drop=drop)
        loss = flow_loss(pipe, x0, m, caps, gen, shift, shape_weight)
        if world_weight:
            if focus is None:
                texts = [c for c in caps if c][:world_batch]
            else:
                rng = np.random.default_rng([seed, step, 1])
                specs = [focus.draw(rng, lambda sp: world.caption(sp) in HELDOUT_SET) for _ in range(world_batch)]
                texts = [world.caption(sp) for sp in specs]
            world_loss, world_logs = t2i_world_tune_loss(pipe, texts, world_steps, world_guidance, gen, shape_weight)
            loss = loss + world_weight * world_loss
            if focus is not None:
                focus.update(specs, world_logs["wrong"])
                state["focus"] = focus.state_dict()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        ema_update(ema.denoiser, pipe.denoiser, decay)
        ema_update(ema.text_encoder, pipe.text_encoder, decay)
        if decoder_lr:
            ema_update(ema.vae.decoder, pipe.vae.decoder, decay)
        state["step"] = step + 1
        state["train_seconds"] += time.time() - t0
        losses.append(loss.item())
        if state["step"] % 50 == 0:
            log(f"step {state['step']} loss {np.mean(losses[-50:]):.4f} "
                f"{state['train_seconds'] / 60:.1f} min ({(time.time() - t0):.2f} s/step)"
                + (f" hardest {focus.worst(4)}" if focus is not None else ""))
        now = time.time()
        if now - last_eval >= eval_minutes * 60:
            run_eval()
            last_eval = time.time()
        if now - last_ckpt >= ckpt_minutes * 60:
            save_checkpoint()
            last_ckpt = time.time()
            log(f"checkpoint step {state['step']}")
    save_checkpoint()
    if eval_n and (not state["evals"] or state["evals"][-1]["step"] != state["step"]):
        run_eval()
        save_checkpoint()
    log(f"done: step {state['step']}, {state['train_seconds'] / 60:.1f} training minutes")
    return {"state": state, "pipe": pipe, "ema": ema, "last_loss": losses[-1] if losses else math.nan}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m magic_demo.train.t2i", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/t2i", help="checkpoint folder (git-ignored)")
    ap.add_argument("--minutes", type=float, default=45.0, help="wall-clock minutes to train in this run")
    ap.add_argument("--max-steps", type=int, default=None, help="stop at this total step count")
    ap.add_argument("--config", default="small", choices=sorted(CONFIGS))
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--shift", type=float, default=3.0, help="sigma shift (training and the exported scheduler)")
    ap.add_argument("--ckpt-minutes", type=float, default=3.0)
    ap.add_argument("--eval-minutes", type=float, default=5.0)
    ap.add_argument("--eval-n", type=int, default=50)
    ap.add_argument("--export", default="assets/mini/t2i", help="where the best weights are exported ('' = none)")
    ap.add_argument("--init", default=None, help="start from an exported folder when there is no checkpoint")
    ap.add_argument("--init-blocks", default=None,
                    help="start a model for another VAE (--config) from this exported folder's transformer blocks "
                         "and text encoder (the latent input/output layers start fresh)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ema-decay", type=float, default=0.999, help="of the evaluated and exported weight average")
    ap.add_argument("--eval-steps", type=int, nargs="+", default=[8], help="sampling steps the evals try")
    ap.add_argument("--eval-guidance", type=float, nargs="+", default=[1.0, 2.0], help="CFG scales the evals try")
    ap.add_argument("--world-weight", type=float, default=0.0, help="weight of the world-target loss (0: off)")
    ap.add_argument("--world-batch", type=int, default=16, help="captions per step for the world-target loss")
    ap.add_argument("--world-steps", type=int, default=8, help="sampling steps of the world-target loss")
    ap.add_argument("--world-guidance", type=float, default=4.0, help="CFG scale of the world-target loss")
    ap.add_argument("--world-focus", action="store_true",
                    help="draw the world-loss captions more often from groups the model gets wrong")
    ap.add_argument("--decoder-lr", type=float, default=0.0,
                    help="also train the model's own decoder with the world-target loss at this lr (0: frozen)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    train(out=a.out, minutes=a.minutes, max_steps=a.max_steps, config=a.config, batch=a.batch, lr=a.lr,
          shift=a.shift, ckpt_minutes=a.ckpt_minutes, eval_minutes=a.eval_minutes, eval_n=a.eval_n,
          export_dir=a.export or None, init=a.init, seed=a.seed, threads=a.threads, ema_decay=a.ema_decay,
          eval_steps=tuple(a.eval_steps), eval_guidance=tuple(a.eval_guidance), world_weight=a.world_weight,
          world_batch=a.world_batch, world_steps=a.world_steps, world_guidance=a.world_guidance,
          world_focus=a.world_focus, decoder_lr=a.decoder_lr, init_blocks=a.init_blocks, log=log)


if __name__ == "__main__":
    sys.exit(main())
