"""Train the miniature I2V teacher: rectified flow on the procedural world, exactly the real conditioning.

The frozen VAE (trained first, `magic_demo.train.vae`) turns world clips into latents; the frozen, seeded
LLaVA-style text encoder (Llama text + CLIP vision, so the image-token path is exercised) and CLIP text
encoder read the captions. The `HunyuanVideoTransformer3DModel` (latent_concat, 2C+1 inputs) learns the
velocity n - x0 of x_t = sigma*n + (1-sigma)*x0, with captions dropped 10% of the time (for CFG).

    python -m magic_demo.train.i2v --out runs/i2v --vae assets/mini/vae --minutes 120

Resumable: the latest checkpoint in --out is picked up. Every checkpoint exports the teacher + frozen components to --export (teacher/ of the folder the `mini`
presets load; `magic_demo.train.distill` turns it into the 4-step student in transformer/).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from magic_demo.evaluate import evaluate_i2v
from magic_demo.pipeline import MagicI2VPipeline
from magic_demo.presets import load_components, save_components
from magic_demo.sampling import make_scheduler
from magic_demo.train.batches import (edge_start_sampler, encode_batch, noise_condition, noise_levels, sample_clips,
                                      shape_loss_weights, velocity, weighted_mse)
from magic_demo.tiny import (TinyConfig, build_clip_text, build_image_processor, build_text_encoder, build_transformer,
                             build_word_tokenizer)

MINI = TinyConfig(latent_channels=16, heads=4, head_dim=32, rope_axes_dim=(8, 12, 12), double_layers=2,
                  single_layers=2, refiner_layers=1, text_hidden=64, text_layers=2, vision_image_size=32,
                  vision_patch=8, clip_hidden=64, patch_size=2)
TEACHER = "teacher"  # the preset folder's teacher/ (the distilled student the app runs is transformer/)
FROZEN = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "image_processor", "scheduler")


def build_frozen_text(cfg: TinyConfig, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    tok = build_word_tokenizer()
    return dict(text_encoder=build_text_encoder(cfg, len(tok)).eval(), tokenizer=tok,
                text_encoder_2=build_clip_text(cfg, len(tok)).eval(), tokenizer_2=build_word_tokenizer(),
                image_processor=build_image_processor(cfg), scheduler=make_scheduler())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/i2v")
    p.add_argument("--vae", default="assets/mini/vae")
    p.add_argument("--export", default=None, help="preset folder to write at each checkpoint (e.g. assets/mini)")
    p.add_argument("--init", default=None, help="continue a shipped preset folder (no checkpoint in --out yet)")
    p.add_argument("--init-blocks", default=None,
                   help="start a teacher for a new VAE (--vae) from this preset folder's teacher: every weight whose "
                        "shape matches is copied (blocks, text and time embedders), the patch embedding and output "
                        "projection start fresh, and the frozen text components are this folder's")
    p.add_argument("--minutes", type=float, default=60)
    p.add_argument("--max-steps", type=int, default=10**9)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--text-dropout", type=float, default=0.1)
    p.add_argument("--image-dropout", type=float, default=0.1,
                   help="fraction of clips trained as text-to-video (no image), so the teacher also serves T2V")
    p.add_argument("--text-lr-scale", type=float, default=1.0,
                   help="lr multiplier for the layers that read the text features (TEXT_INPUT_LAYERS): the frozen "
                        "random text encoders give small inputs (norm ~0.15 per token), which Adam's fixed-size "
                        "steps amplify only slowly")
    p.add_argument("--ema", type=float, default=0.0,
                   help="decay of an exponential moving average of the weights (0: off; e.g. 0.999); evals, "
                        "snapshots and exports then use the average, which smooths out the step-to-step swings")
    p.add_argument("--echo", type=int, default=1,
                   help="optimisation steps per encoded batch, each with fresh noise levels and noise (data "
                        "echoing): encoding a batch (VAE over 8 x 17 frames) costs ~3x the transformer step on CPU")
    p.add_argument("--anneal", type=int, default=0,
                   help="decay the lr linearly to 0 over the last ANNEAL steps before --max-steps (0: constant lr); "
                        "a constant-lr run is still noisy where it stops, and the decay settles it")
    p.add_argument("--shape-weight", type=float, default=1.0,
                   help="loss weight of the latent pixels that cover the shape (1: plain MSE); the background is "
                        "~90%% of every frame, so the shape's colour and outline get a small share of a plain loss")
    p.add_argument("--condition-noise", type=float, default=0.0,
                   help="noise half of the conditioning image latents with std ~ U(0, this) (batches.noise_condition): "
                        "robustness to the model's own frames conditioning the next window (0: off)")
    p.add_argument("--edge-starts", type=float, default=0.0,
                   help="fraction of clips that start with the shape reaching the wall it moves toward within a second "
                        "(batches.edge_start_sampler), as a sliding window's later windows do (0: off)")
    p.add_argument("--ckpt-minutes", type=float, default=5)
    p.add_argument("--eval-clips", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default="mini", choices=["mini", "test"])
    p.add_argument("--patch-size", type=int, default=None,
                   help="spatial patch of the transformer (default: the config's, 2 for mini); with --init from a "
                        "teacher of patch 2, patch 1 starts from its weights (see repatch_to_1)")
    p.add_argument("--mlp-ratio", type=float, default=None,
                   help="feed-forward width of the blocks / hidden width (default: the config's, 2 for mini); with "
                        "--init from a narrower teacher, its weights are kept and the new units start silent "
                        "(widen_feed_forward), so training goes on from the same function with more capacity")
    p.add_argument("--single-layers", type=int, default=None,
                   help="single-stream blocks (default: the config's, 2 for mini); with --init from a shallower teacher "
                        "the extra blocks are appended after its own and start as the identity (deepen_model): more "
                        "attention layers to carry the first frame across frames")
    args = p.parse_args(argv)
    if args.echo < 1:
        p.error(f"--echo must be >= 1, got {args.echo}")
    if args.shape_weight < 1:
        p.error(f"--shape-weight must be >= 1, got {args.shape_weight}")
    if args.condition_noise < 0:
        p.error(f"--condition-noise must be >= 0, got {args.condition_noise}")
    if not 0 <= args.edge_starts <= 1:
        p.error(f"--edge-starts must be in [0, 1], got {args.edge_starts}")
    if args.init and args.init_blocks:
        p.error("--init and --init-blocks exclude each other (--init continues a teacher, --init-blocks starts one)")
    if args.mlp_ratio is not None and args.mlp_ratio <= 0:
        p.error(f"--mlp-ratio must be > 0, got {args.mlp_ratio}")
    if args.single_layers is not None and args.single_layers < 1:
        p.error(f"--single-layers must be >= 1, got {args.single_layers}")
    if args.anneal and args.max_steps == p.get_default("max_steps"):
        p.error("--anneal needs --max-steps (the step the decay ends at)")
    torch.set_num_threads(args.threads)
    draw_spec = edge_start_sampler(args.edge_starts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "train.log", "a", buffering=1)

    def say(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        log.write(line + "\n")

    # Frozen components (VAE snapshot + seeded text encoders) are written once and reused across restarts:
    # the transformer must ship with exactly the components it was trained against.
    frozen_dir = out / "frozen"
    if not frozen_dir.is_dir():
        staging = out / "frozen.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        skip = shutil.ignore_patterns("*.png", "*.md")
        if not args.init:  # a new teacher: the VAE given
            shutil.copytree(args.vae, staging / "vae", ignore=skip)
        # --init continues a shipped preset with its exact components; --init-blocks keeps the text components
        # its copied text-reading layers learned on
        copy_from = args.init or args.init_blocks
        if copy_from:
            for name in FROZEN:
                if not (staging / name).exists():
                    shutil.copytree(Path(copy_from) / name, staging / name, ignore=skip)
        else:
            save_components(build_frozen_text(MINI if args.config == "mini" else TinyConfig(), seed=args.seed),
                            staging)
        staging.rename(frozen_dir)
    comps = load_components(frozen_dir, names=FROZEN)
    comps["vae"].eval().requires_grad_(False)
    vae = comps["vae"]
    c = vae.config.latent_channels
    cfg = MINI if args.config == "mini" else TinyConfig(patch_size=2)
    patch = args.patch_size or cfg.patch_size
    init_config = Path(args.init or "", TEACHER, "config.json")
    # continuing a teacher keeps its feed-forward width and depth unless --mlp-ratio / --single-layers ask for others
    init_cfg = json.loads(init_config.read_text()) if args.init and init_config.is_file() else {}
    mlp_ratio = args.mlp_ratio or init_cfg.get("mlp_ratio", cfg.mlp_ratio)
    single_layers = args.single_layers or init_cfg.get("num_single_layers", cfg.single_layers)
    transformer = build_transformer(TinyConfig(**{**cfg.__dict__, "latent_channels": c, "patch_size": patch,
                                                  "mlp_ratio": mlp_ratio, "single_layers": single_layers}))
    pipe = MagicI2VPipeline(transformer=transformer, **comps)
    opt = torch.optim.AdamW(param_groups(transformer, args.text_lr_scale), lr=args.lr, weight_decay=0.01,
                            betas=(0.9, 0.99))
    step, best = 0, -1.0
    warm_from = 0  # the step a fresh optimizer starts at: the lr warms up from there
    ckpt = out / "ckpt.pt"
    if ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        transformer.load_state_dict(state["model"])
        if len(state["opt"]["param_groups"]) == len(opt.param_groups):
            scales = [g["lr_scale"] for g in opt.param_groups]  # this run's choice, not the checkpoint's
            opt.load_state_dict(state["opt"])
            for g, scale in zip(opt.param_groups, scales):
                g["lr_scale"] = scale
        else:
            say("parameter groups changed (--text-lr-scale): fresh optimizer state")
            warm_from = state["step"]
        step, best = state["step"], state.get("best", -1.0)
        say(f"resumed at step {step}")
    elif args.init:
        source = type(transformer).from_pretrained(Path(args.init) / TEACHER)
        if source.config.mlp_ratio != mlp_ratio:
            say(f"feed-forward widened from ratio {source.config.mlp_ratio} to {mlp_ratio}; new units silent")
            source = widen_model(source, mlp_ratio, args.seed)
        if source.config.num_single_layers != single_layers:
            say(f"single-stream blocks {source.config.num_single_layers} -> {single_layers}; new blocks start as the "
                "identity")
            source = deepen_model(source, single_layers, args.seed)
        weights = source.state_dict()
        if source.config.patch_size != patch:
            weights = repatch_to_1(weights, source.config.patch_size, patch)
            say(f"patch {source.config.patch_size} weights converted to patch {patch}")
        transformer.load_state_dict(weights)
        info = Path(args.init) / "training.json"
        step = json.loads(info.read_text()).get("teacher", {}).get("i2v_step", 0) if info.is_file() else 0
        say(f"initialised from {args.init} (step {step}); fresh optimizer")
        warm_from = step
    elif args.init_blocks:
        source = type(transformer).from_pretrained(Path(args.init_blocks) / TEACHER)
        copied, fresh = transfer_matching(transformer, source)
        say(f"blocks from {args.init_blocks}: {copied} tensors copied, fresh: {', '.join(fresh)}")
    ema, ema_steps = None, 0
    if args.ema:
        ema = copy.deepcopy(transformer).requires_grad_(False)
        if ckpt.is_file() and "ema" in state:
            ema.load_state_dict(state["ema"])
            ema_steps = state.get("ema_steps", 0)
        else:
            say(f"weight average (decay {args.ema}) starts from the step-{step} weights")
    n_params = sum(p.numel() for p in transformer.parameters())
    say(f"transformer {n_params / 1e6:.2f}M params, batch {args.batch} x {args.frames} frames, lr {args.lr}")
    gen = torch.Generator().manual_seed(args.seed * 7919 + step)
    t_end = time.time() + 60 * args.minutes
    t_ckpt = time.time() + 60 * args.ckpt_minutes
    losses, batch, echoed, encoded = [], None, 0, 0
    while time.time() < t_end and step < args.max_steps:
        transformer.train()
        # A resumed run starts a fresh batch even mid-echo: resumes already differ from an unbroken run, since the
        # noise generator is reseeded from the step.
        if batch is None or echoed == args.echo:
            text_only = (torch.rand(args.batch, generator=gen) < args.image_dropout).tolist()
            video, captions, firsts = sample_clips(step, args.batch, args.frames, args.size, args.fps, args.seed,
                                                   args.text_dropout, draw_spec)
            batch = encode_batch(pipe, video, captions, firsts, text_only=text_only)
            weights = shape_loss_weights(video, batch.x0.shape, args.shape_weight)
            echoed, encoded = 0, encoded + 1
        echoed += 1
        sigma = noise_levels(len(batch.x0), gen)
        noise = torch.randn(batch.x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1, 1)
        pred = velocity(transformer, s * noise + (1 - s) * batch.x0, sigma,
                        noise_condition(batch, args.condition_noise, gen))
        loss = weighted_mse(pred, noise - batch.x0, weights)
        lr = learning_rate(step, args.lr, warm_from, args.warmup, args.max_steps, args.anneal)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        step += 1
        if ema is not None:
            ema_steps += 1
            update_ema(ema, transformer, args.ema)
        losses.append(loss.item())
        if step % 25 == 0:
            say(f"step {step} loss {np.mean(losses[-25:]):.4f} lr {lr:.2e}")
        if time.time() >= t_ckpt or time.time() >= t_end or step >= args.max_steps:
            transformer.eval()
            published = ema if ema is not None else transformer  # what is evaluated, snapshotted, exported
            pipe.transformer = published
            score = evaluate_i2v(pipe, n=args.eval_clips, steps=4, num_frames=args.frames, fps=args.fps,
                                 size=args.size)
            metric = score.motion_accuracy + 0.5 * score.colour_kept
            say(f"step {step} eval (4 steps, {score.clips} held-out clips): {score.as_dict()}")
            extra = {"ema": ema.state_dict(), "ema_steps": ema_steps} if ema is not None else {}
            torch.save({"model": transformer.state_dict(), "opt": opt.state_dict(), "step": step,
                        "best": max(best, metric), **extra}, out / "ckpt.tmp")
            (out / "ckpt.tmp").replace(ckpt)
            # Every checkpoint's weights are kept: in-training evals are small and noisy, so checkpoints are
            # chosen afterwards on more clips (`python -m magic_demo eval --transformer ...`).
            published.save_pretrained(out / "snapshots" / f"step_{step:06d}", safe_serialization=True)
            if metric >= best and args.export:
                best = metric
                export(pipe, Path(args.export), frozen_dir, step, score)
                say(f"exported step {step} to {args.export}")
            pipe.transformer = transformer
            t_ckpt = time.time() + 60 * args.ckpt_minutes
    say(f"done at step {step} ({encoded} batches encoded this run)")


def learning_rate(step: int, base: float, warm_from: int, warmup: int, max_steps: int, anneal: int) -> float:
    """Linear warm-up from `warm_from` (where this optimizer started), then constant, then (anneal > 0) a linear
    decay to 0 over the last `anneal` steps before `max_steps`."""
    lr = base * min(1.0, (step - warm_from + 1) / warmup)
    if anneal > 0:
        lr *= min(1.0, max(0.0, (max_steps - step) / anneal))
    return lr


def repatch_to_1(state: dict, src: int, dst: int) -> dict:
    """A patch-`src` transformer's weights as a patch-1 one (a finer token grid: one token per latent pixel).
    The patch embedding's kernel is summed, so a flat region gives the same token as before; the output
    projection's `src` x `src` sub-positions are averaged. Every other weight is per token and kept; the rotary
    positions now count finer tokens, which fine-tuning has to absorb."""
    if dst != 1:
        raise ValueError(f"only a conversion to patch 1 is supported, got patch {src} -> {dst}")
    state = dict(state)
    w = state["x_embedder.proj.weight"]  # [D, C_in, p_t, p, p]
    state["x_embedder.proj.weight"] = w.sum(dim=(3, 4), keepdim=True)
    d = state["proj_out.weight"].shape[1]
    # Output features are ordered (channel, p_t, p, p), as the model unpatchifies them.
    state["proj_out.weight"] = state["proj_out.weight"].view(-1, src * src, d).mean(1)
    state["proj_out.bias"] = state["proj_out.bias"].view(-1, src * src).mean(1)
    return state


# The tensors that read a block's feed-forward units: their new columns start at zero so that the wider model computes
# exactly what the narrower one did (the new units still get gradients through them and start to learn).
FEED_FORWARD_OUTPUTS = ("ff.net.2.weight", "ff_context.net.2.weight")
SINGLE_BLOCK_OUTPUT = "proj_out.weight"  # single blocks: [attention output ; feed-forward units] -> hidden


def widen_feed_forward(narrow: dict, wide: dict) -> dict:
    """A teacher's weights in a model of the same config but wider feed-forward layers (`wide`: that model's
    freshly initialised state). Every narrow tensor fills the leading slice of its wide counterpart; the extra
    input rows keep their fresh initialisation and the extra output columns are zero, so the function is
    unchanged. Only feed-forward tensors may differ in shape."""
    state = {}
    for name, target in wide.items():
        source = narrow[name]
        if source.shape == target.shape:
            state[name] = source
            continue
        reads_units = name.endswith(FEED_FORWARD_OUTPUTS) or (
            name.startswith("single_transformer_blocks.") and name.endswith(SINGLE_BLOCK_OUTPUT))
        if not (reads_units or ".ff" in name or "proj_mlp" in name):
            raise ValueError(f"{name}: shape {tuple(source.shape)} -> {tuple(target.shape)} is not a feed-forward "
                             "change")
        if any(a > b for a, b in zip(source.shape, target.shape)):
            raise ValueError(f"{name}: shape {tuple(source.shape)} -> {tuple(target.shape)} narrows; only widening keeps "
                             "the function")
        grown = torch.zeros_like(target) if reads_units else target.clone()
        grown[tuple(slice(0, n) for n in source.shape)] = source
        state[name] = grown
    return state


def widen_model(model: torch.nn.Module, mlp_ratio: float, seed: int = 0) -> torch.nn.Module:
    """A copy of a transformer (teacher or student) with feed-forward layers `mlp_ratio` times its hidden width and
    the same function (widen_feed_forward); the new units' input rows are drawn from `seed`."""
    torch.manual_seed(seed)
    wide = type(model).from_config({**model.config, "mlp_ratio": float(mlp_ratio)})
    wide.load_state_dict(widen_feed_forward(model.state_dict(), wide.state_dict()))
    return wide


def deepen_model(model: torch.nn.Module, single_layers: int, seed: int = 0) -> torch.nn.Module:
    """A copy of a transformer with `single_layers` single-stream blocks: its own blocks first, then new ones drawn
    from `seed` whose output projection starts at zero, so each adds nothing to the residual stream and the
    function is unchanged (the zero projection still gets gradients, and through it the block starts to learn)."""
    have = model.config.num_single_layers
    if single_layers < have:
        raise ValueError(f"single_layers={single_layers} < the model's {have}: only deepening keeps the function")
    torch.manual_seed(seed)
    deep = type(model).from_config({**model.config, "num_single_layers": int(single_layers)})
    state = deep.state_dict()
    state.update(model.state_dict())
    for i in range(have, single_layers):
        for name in ("weight", "bias"):
            state[f"single_transformer_blocks.{i}.proj_out.{name}"].zero_()
    deep.load_state_dict(state)
    return deep


@torch.no_grad()
def transfer_matching(model: torch.nn.Module, source: torch.nn.Module) -> tuple[int, list[str]]:
    """Copy every tensor of `source` whose name and shape match into `model`: a teacher trained on one latent space
    lends its attention blocks and text/time embedders to one for another (same width, same token grid); the
    layers that read or write latents have other shapes and keep their fresh initialisation. Returns (copied,
    names left fresh)."""
    theirs = source.state_dict()
    mine = model.state_dict()
    fresh = [k for k, v in mine.items() if k not in theirs or theirs[k].shape != v.shape]
    model.load_state_dict({**mine, **{k: theirs[k] for k in mine if k not in fresh}})
    return len(mine) - len(fresh), fresh


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for avg, p in zip(ema.parameters(), model.parameters()):
        avg.lerp_(p, 1.0 - decay)


# The layers that read the text encoders' outputs directly: the token refiner's input projection and the two
# pooled-text embedders (the refiner's masked mean of the tokens, and CLIP's pooled output).
TEXT_INPUT_LAYERS = ("context_embedder.proj_in.", "context_embedder.time_text_embed.text_embedder.",
                     "time_text_embed.text_embedder.")


def param_groups(transformer, text_lr_scale: float) -> list[dict]:
    """All parameters in one group, or two when the text input layers get their own lr multiplier."""
    named = list(transformer.named_parameters())
    if text_lr_scale == 1.0:
        return [{"params": [p for _, p in named], "lr_scale": 1.0}]
    text = [p for n, p in named if n.startswith(TEXT_INPUT_LAYERS)]
    rest = [p for n, p in named if not n.startswith(TEXT_INPUT_LAYERS)]
    return [{"params": rest, "lr_scale": 1.0}, {"params": text, "lr_scale": text_lr_scale}]


def export(pipe: MagicI2VPipeline, dest: Path, frozen_dir: Path, step: int, score) -> None:
    """Write the transformer + the frozen components it was trained with into the preset folder, each subfolder
    staged first and swapped in, so a crash never leaves a half-written component. An existing vae/ is kept: the
    VAE trainer may still be improving its decoder there (with --freeze-encoder the latent space does not move)."""
    staging = dest / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    pipe.transformer.save_pretrained(staging / TEACHER, safe_serialization=True)
    names = [n for n in FROZEN if n != "vae" or not (dest / "vae" / "config.json").is_file()]
    for name in names:
        shutil.copytree(frozen_dir / name, staging / name)
    for name in (TEACHER, *names):
        shutil.rmtree(dest / name, ignore_errors=True)
        (staging / name).rename(dest / name)
    shutil.rmtree(staging, ignore_errors=True)
    info = dest / "training.json"
    record = json.loads(info.read_text()) if info.is_file() else {}
    record["teacher"] = {"folder": TEACHER, "i2v_step": step, "eval_4_steps": score.as_dict()}
    info.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
