"""Run the paper's distillation on the miniature teacher: CFG distillation, then DMD2 step distillation.

    python -m magic_demo.train.distill cfg  --preset-dir assets/mini --out runs/cfg  --minutes 30
    python -m magic_demo.train.distill dmd2 --preset-dir assets/mini --out runs/dmd2 --minutes 60 --steps 4
    python -m magic_demo.train.distill world --preset-dir assets/mini --out runs/world --minutes 30 --steps 4

`cfg` turns the teacher (assets/mini/teacher) into a student with a guidance input; `dmd2` distils a base
(the CFG student when --base points at it, else the teacher) into a `--steps`-step generator on the Magic
1-For-1 sigmas. `world` goes on training a CFG-distilled student (--init, default <preset-dir>/transformer) with
the CFG-distillation loss plus `--world-weight` times the world-target loss on its own `--steps`-step samples
(distill/world_tune.py); `--chain F` makes that share of its clips second windows of a sliding window, conditioned on
the student's own last frame. All resume from --out and export the trained transformer to --export (a diffusers folder).
`--t2v` trains and evaluates without the first frame (`encode_batch(text_only=...)`: the paper's T2V
comparison, Fig. 5).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import HunyuanVideoTransformer3DModel

from magic_demo.distill.cfg import CFGDistillConfig, cfg_distill_loss, student_from_teacher
from magic_demo.distill.dmd2 import DMD2, DMD2Config
from magic_demo.evaluate import evaluate_i2v
from magic_demo.pipeline import MagicI2VPipeline
from magic_demo.presets import load_components
from magic_demo.sampling import build_sigmas, make_scheduler
from magic_demo.distill.world_tune import chain_windows, world_tune_loss
from magic_demo.train.batches import edge_start_sampler, encode_batch, sample_clips, shape_loss_weights, step_specs
from magic_demo.train.focus import FailureFocus
from magic_demo.train.i2v import learning_rate, widen_model

TEXT = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "image_processor", "scheduler")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", choices=["cfg", "dmd2", "world"])
    p.add_argument("--preset-dir", default="assets/mini", help="folder with the teacher and its frozen components")
    p.add_argument("--base", default=None, help="transformer folder to distil (default: <preset-dir>/teacher)")
    p.add_argument("--init", default=None,
                   help="world: the CFG-distilled student to tune (default: <preset-dir>/transformer)")
    p.add_argument("--world-weight", type=float, default=1.0,
                   help="world: weight of the world-target loss next to the CFG-distillation loss")
    p.add_argument("--world-focus", action="store_true",
                   help="world: draw more clips of the (shape, background) groups the student gets wrong (train/focus.py)")
    p.add_argument("--decoder-lr", type=float, default=0.0,
                   help="world: also train the VAE's decoder with the world-target loss at this lr (0: frozen; the "
                        "encoder stays frozen); the whole VAE is saved to <out>/vae")
    p.add_argument("--edge-starts", type=float, default=0.0,
                   help="cfg/world: fraction of clips that start with the shape reaching the wall it moves toward "
                        "within a second (`train.batches.edge_start_sampler`), as a sliding window's later windows do")
    p.add_argument("--chain", type=float, default=0.0,
                   help="world: fraction of each batch's clips that are second windows, conditioned on the student's "
                        "own last frame of a first window (`distill.world_tune.chain_windows`)")
    p.add_argument("--mlp-ratio", type=float, default=None,
                   help="world: first widen the student's feed-forward layers to this ratio of its hidden width, its "
                        "function kept (`train.i2v.widen_feed_forward`): more capacity for the world tuning")
    p.add_argument("--out", required=True)
    p.add_argument("--export", default=None)
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--max-iters", type=int, default=10**9)
    p.add_argument("--steps", type=int, default=4, help="generator steps (dmd2)")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance input of a CFG-distilled base (dmd2) / of the tuned student's samples (world: 1)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4, help="student (cfg) / generator (dmd2) learning rate")
    p.add_argument("--lr-fake", type=float, default=3e-4)
    p.add_argument("--anneal", type=int, default=0,
                   help="cfg: decay the lr linearly to 0 over the last ANNEAL iterations before --max-iters")
    p.add_argument("--shape-weight", type=float, default=1.0,
                   help="cfg: loss weight of the latent pixels that cover the shape (as `train i2v --shape-weight`)")
    p.add_argument("--condition-noise", type=float, default=0.0,
                   help="cfg: the student sees noised conditioning latents, the teacher clean ones (as `train i2v "
                        "--condition-noise`)")
    p.add_argument("--t2v", action="store_true")
    p.add_argument("--eval-every", type=int, default=50, help="iterations between metric points (Fig. 5 curve)")
    p.add_argument("--eval-clips", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    student_recipe = args.recipe in ("cfg", "world")  # a student trained with the CFG-distillation loss
    if args.condition_noise != 0 and (not student_recipe or args.condition_noise < 0):
        p.error(f"--condition-noise is for cfg and world and must be >= 0, got {args.condition_noise} for {args.recipe}")
    if args.shape_weight != 1 and (not student_recipe or args.shape_weight < 1):
        p.error(f"--shape-weight is for cfg and world and must be >= 1, got {args.shape_weight} for {args.recipe}")
    if args.anneal and (not student_recipe or args.max_iters == p.get_default("max_iters")):
        p.error("--anneal is for cfg and world and needs --max-iters (the iteration the decay ends at)")
    if args.edge_starts and (not student_recipe or not 0 < args.edge_starts <= 1):
        p.error(f"--edge-starts is for cfg and world and must be in (0, 1], got {args.edge_starts} for {args.recipe}")
    if (args.init is not None or args.world_weight != 1 or args.world_focus or args.decoder_lr or args.chain
            or args.mlp_ratio is not None) and args.recipe != "world":
        p.error("--init, --world-weight, --world-focus, --decoder-lr, --chain and --mlp-ratio are for the world recipe")
    if args.mlp_ratio is not None and args.mlp_ratio <= 0:
        p.error(f"--mlp-ratio must be > 0, got {args.mlp_ratio}")
    if not 0 <= args.chain <= 1:
        p.error(f"--chain must be in [0, 1], got {args.chain}")
    if args.recipe == "world" and args.guidance is None:
        args.guidance = 1.0  # the app's guidance input
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "train.log", "a", buffering=1)

    def say(msg):
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        log.write(line + "\n")

    comps = load_components(args.preset_dir, int8_if_available=False, names=TEXT)
    base = HunyuanVideoTransformer3DModel.from_pretrained(args.base or Path(args.preset_dir) / "teacher")
    base.eval().requires_grad_(False)
    pipe = MagicI2VPipeline(transformer=base, **comps)
    gen = torch.Generator().manual_seed(args.seed)
    ckpt = out / "ckpt.pt"
    curve = []
    if student_recipe:
        if args.recipe == "world":
            student = HunyuanVideoTransformer3DModel.from_pretrained(args.init or Path(args.preset_dir) / "transformer")
            if args.mlp_ratio is not None and args.mlp_ratio != student.config.mlp_ratio:
                say(f"student feed-forward widened from ratio {student.config.mlp_ratio} to {args.mlp_ratio}")
                student = widen_model(student, args.mlp_ratio, args.seed)  # a resumed run then loads its checkpoint
            comps["vae"].requires_grad_(False)  # the world loss backpropagates through the decoder
            comps["vae"].decoder.requires_grad_(args.decoder_lr > 0)
            sigmas, _ = build_sigmas(make_scheduler(), args.steps)
        else:
            student = student_from_teacher(base)
        student.train()
        groups, lr_scales = [{"params": list(student.parameters())}], [1.0]
        if args.decoder_lr:
            groups.append({"params": list(comps["vae"].decoder.parameters())})
            lr_scales.append(args.decoder_lr / args.lr)
        opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.0)
        trained, cfg = student, CFGDistillConfig()
    else:
        sigmas, _ = build_sigmas(make_scheduler(), args.steps)
        dmd = DMD2(base, sigmas, DMD2Config(guidance_scale=args.guidance), lr_fake=args.lr_fake, lr_g=args.lr)
        trained = dmd.generator
    it = 0
    sample = edge_start_sampler(args.edge_starts)
    focus = FailureFocus(keys=("shape", "background"), sample=sample) if args.world_focus else None
    draw_spec = focus.draw if focus is not None else sample
    if ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        if student_recipe:
            trained.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            if args.decoder_lr:
                comps["vae"].decoder.load_state_dict(state["decoder"])
        else:
            dmd.load_state_dict(state["dmd2"])
        it, curve = state["iter"], json.loads(state["curve"])
        if focus is not None and "focus" in state:
            focus.load_state_dict(json.loads(state["focus"]))
        say(f"resumed at iteration {it}")

    def evaluate(model) -> dict:
        eval_pipe = MagicI2VPipeline(transformer=model.eval(), **comps)
        score = evaluate_i2v(eval_pipe, n=args.eval_clips, steps=args.steps, num_frames=args.frames, fps=args.fps,
                             size=args.size, guidance_scale=args.guidance or 1.0, text_only=args.t2v)
        model.train()
        return score.as_dict()

    if not curve:  # the starting point of the curve: the base itself
        curve.append({"iter": 0, **evaluate(trained)})
        say(f"iter 0 eval {curve[-1]}")
    t_end = time.time() + 60 * args.minutes
    while time.time() < t_end and it < args.max_iters:
        chained = round(args.chain * args.batch)
        video, captions, firsts = sample_clips(10_000 + it, args.batch, 2 * args.frames - 1 if chained else args.frames,
                                               args.size, args.fps, args.seed, 0.0, draw_spec)
        starts = None
        if chained:
            video, starts = chain_windows(student, pipe, video, captions, firsts, chained, args.frames, sigmas,
                                          args.guidance, gen)
        text_only = [args.t2v] * len(captions)
        batch = encode_batch(pipe, video, captions, firsts, text_only, starts)
        if student_recipe:
            # second windows (the first `chained` rows) learn from the world loss alone: the teacher never saw the
            # student's start frames, and its velocity from one copies that frame's errors (the drift chaining undoes)
            plain = slice(chained, None)
            if chained < len(video):
                empty = encode_batch(pipe, video[plain], [""] * (len(video) - chained), firsts[plain], text_only[plain])
                weights = shape_loss_weights(video[plain], batch.x0.shape, args.shape_weight)
                loss, logs = cfg_distill_loss(student, base, batch.rows(plain), empty, gen, cfg, weights,
                                              args.condition_noise)
            else:
                loss, logs = torch.zeros(()), {}
            if args.recipe == "world":
                specs = step_specs(10_000 + it, args.batch, args.seed, draw_spec)
                world_loss, world_logs = world_tune_loss(student, comps["vae"], batch, specs, sigmas, args.guidance,
                                                         gen, args.shape_weight)
                wrong = world_logs.pop("wrong")
                if focus is not None:
                    focus.update(specs, wrong)
                loss, logs = loss + args.world_weight * world_loss, {**logs, **world_logs, "wrong": wrong.mean()}
            for g, scale in zip(opt.param_groups, lr_scales):
                g["lr"] = scale * learning_rate(it, args.lr, warm_from=0, warmup=1, max_steps=args.max_iters,
                                                anneal=args.anneal)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for g in opt.param_groups:
                torch.nn.utils.clip_grad_norm_(g["params"], 1.0)
            opt.step()
        else:
            logs = dmd.step(batch, gen)
        it += 1
        if it % 10 == 0:
            say(f"iter {it} " + " ".join(f"{k} {v:.4f}" for k, v in logs.items())
                + (f" hardest {focus.worst(4)}" if focus is not None else ""))
        if it % args.eval_every == 0 or time.time() >= t_end or it >= args.max_iters:
            curve.append({"iter": it, **evaluate(trained)})
            say(f"iter {it} eval {curve[-1]}")
            state = {"model": trained.state_dict(), "opt": opt.state_dict()} if student_recipe else {
                "dmd2": dmd.state_dict()}
            if focus is not None:
                state["focus"] = json.dumps(focus.state_dict())
            if args.decoder_lr:
                state["decoder"] = comps["vae"].decoder.state_dict()
            torch.save({**state, "iter": it, "curve": json.dumps(curve)}, out / "ckpt.tmp")
            (out / "ckpt.tmp").replace(ckpt)
            (out / "curve.json").write_text(json.dumps(curve, indent=1))
            if args.export:
                trained.save_pretrained(args.export, safe_serialization=True)
            if args.decoder_lr:
                comps["vae"].save_pretrained(out / "vae", safe_serialization=True)
    say(f"done at iteration {it}")


if __name__ == "__main__":
    main()
