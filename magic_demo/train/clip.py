"""Train the miniature retrieval CLIP (open_clip, small custom config) on world first frames (CPU, fp32, resumable).

    python -m magic_demo.train.clip --out runs/clip --minutes 30            # train / resume, export when done
    python -m magic_demo.train.clip --out runs/clip --eval-only             # evaluate the exported model

Data: (image, caption) pairs rendered on the fly from :mod:`magic_demo.world` -- the first frame of a sampled clip
(shade jitter, size, start position as the world draws them) and its exact world caption.  Each batch holds every
(colour, shape, background) class at most once (motion is random: a first frame cannot show it), so the
contrastive batch has no false negatives.  Batches are a pure function of ``(seed, step)``: a resumed run sees the
same data as an uninterrupted one.

Loss: symmetric InfoNCE over the batch with open_clip's learnable logit scale (init ln(1/0.07), clamped to
[0, ln 100] after each step as open_clip's trainer does).  The model is an ordinary open_clip ``CLIP`` built from a
registered config and open_clip's own BPE tokenizer (shipped inside the package: offline).  Its 49,408-row token
table would be most of the weights, so training only learns the rows of the tokens that occur in world captions
(the others are zero) and the export stores just those rows (see ``retrieval.save_clip_safetensors``).

Checkpoints: ``<out>/ckpt_latest.pt`` every ``--ckpt-minutes`` (model, optimizer, step, elapsed time; read back
with ``torch.load(weights_only=True)``); ``<out>/log.jsonl`` holds loss and quick held-out metrics.  Export:
``<export>/open_clip_config.json`` (``model_cfg``) + ``open_clip_model.safetensors`` + ``metrics.json``, loadable
with ``ClipModelSpec.mini(<export>)`` or ``ClipModelSpec.parse("magic-mini-clip")`` for the shipped one.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from magic_demo import world
from magic_demo.retrieval import (CLIP_CONFIG_FILE, CLIP_WEIGHTS_FILE, MINI_CLIP_DIR, MINI_CLIP_NAME, ClipEmbedder,
                                  ClipModelSpec, register_clip_config, save_clip_safetensors)

VOCAB_SIZE = 49408  # open_clip SimpleTokenizer
CONFIGS: dict[str, dict[str, Any]] = {
    # the shipped miniature: ViT 64x64 / patch 8 (64 tokens), 4 layers x 96 wide; text 2 layers x 64 wide
    "mini": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 64, "layers": 4, "width": 96, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": VOCAB_SIZE, "width": 64, "heads": 2, "layers": 2},
    },
    # unit tests only
    "test": {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": VOCAB_SIZE, "width": 32, "heads": 2, "layers": 1},
    },
}
VISUAL_CLASSES = list(itertools.product(world.COLOURS, world.SHAPES, world.BACKGROUNDS))  # 96
HELD_OUT_SEED = 7_000_000  # held-out renders/captions use rng streams [HELD_OUT_SEED + seed, ...]


def all_captions() -> list[str]:
    return [world.caption(world.ClipSpec(s, c, m, b))
            for c, s, m, b in itertools.product(world.COLOURS, world.SHAPES, world.MOTIONS, world.BACKGROUNDS)]


# ------------------------------------------------------------------------------------------------ model
class CompactTokenEmbedding(nn.Module):
    """Drop-in for ``nn.Embedding(49408, width)`` that learns only the rows of ``token_ids`` (others are zero)."""

    def __init__(self, token_ids: Sequence[int], weight: torch.Tensor) -> None:
        super().__init__()
        ids = torch.as_tensor(sorted(set(int(i) for i in token_ids)), dtype=torch.long)
        self.num_embeddings, self.embedding_dim = weight.shape
        lookup = torch.full((self.num_embeddings,), len(ids), dtype=torch.long)
        lookup[ids] = torch.arange(len(ids))
        self.register_buffer("ids", ids)
        self.register_buffer("lookup", lookup)
        self.rows = nn.Parameter(weight.detach()[ids].clone())

    @property
    def weight(self) -> torch.Tensor:  # the full table (zeros outside the learned rows)
        full = self.rows.new_zeros(self.num_embeddings, self.embedding_dim)
        return full.index_copy(0, self.ids, self.rows)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        table = torch.cat([self.rows, self.rows.new_zeros(1, self.embedding_dim)])
        return F.embedding(self.lookup[tokens], table)


def resolve_config(config: str | dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(CONFIGS[config] if isinstance(config, str) else config))


def build_model(config: str | dict[str, Any], seed: int = 0, arch: str = MINI_CLIP_NAME + "-train"):
    """(model with a compact token table, preprocess, tokenizer, config dict) for a config name or dict."""
    import logging

    import open_clip

    cfg = resolve_config(config)
    register_clip_config(arch, cfg)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # "initialized randomly" is intended
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
    finally:
        root.setLevel(level)
    tokenizer = open_clip.get_tokenizer(arch)
    used = torch.unique(tokenizer(all_captions())).tolist()
    model.token_embedding = CompactTokenEmbedding(used, model.token_embedding.weight)
    return model, preprocess, tokenizer, cfg


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain open_clip state dict (compact token table expanded, rows outside it zero)."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("token_embedding."):
            continue
        out[k] = v.detach().clone()
    out["token_embedding.weight"] = model.token_embedding.weight.detach().clone()
    return out


def _normalize_params(preprocess) -> tuple[torch.Tensor, torch.Tensor]:
    for t in getattr(preprocess, "transforms", []):
        if t.__class__.__name__ == "Normalize":
            return (torch.tensor(t.mean, dtype=torch.float32).view(1, 3, 1, 1),
                    torch.tensor(t.std, dtype=torch.float32).view(1, 3, 1, 1))
    raise ValueError("preprocess has no Normalize")


def images_to_tensor(images: Sequence[np.ndarray], mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 [H,W,3] images already at the model's size -> normalised [B,3,H,W] (same as open_clip's preprocess)."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return (x - mean) / std


# ------------------------------------------------------------------------------------------------ data
def make_batch(step: int, seed: int, batch: int, image_size: int):
    """(images uint8 list, captions, specs): ``batch`` distinct (colour, shape, background) classes, world jitter."""
    if batch > len(VISUAL_CLASSES):
        raise ValueError(f"batch {batch} > {len(VISUAL_CLASSES)} visual classes (would add false negatives)")
    rng = np.random.default_rng([seed, step])
    order = rng.permutation(len(VISUAL_CLASSES))[:batch]
    specs = [world.sample_spec(rng, colour=VISUAL_CLASSES[i][0], shape=VISUAL_CLASSES[i][1],
                               background=VISUAL_CLASSES[i][2]) for i in order]
    images = [world.render_first_frame(s, size=image_size) for s in specs]
    return images, [world.caption(s) for s in specs], specs


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE on L2-normalised features."""
    logits = logit_scale.exp() * img @ txt.t()
    labels = torch.arange(len(img))
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def _param_groups(model: nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "embedding" in n or "logit_scale" in n else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


# ------------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def text_image_recall(embed_images, embed_texts, *, image_size: int = world.DEFAULT_SIZE, per_class: int = 2,
                      seed: int = 0) -> dict[str, float]:
    """Text->image recall on held-out renders: ``per_class`` fresh images of each of the 96 (colour, shape,
    background) classes; each class's caption (random motion) queries them all.  R@k = a top-k image is of the
    query's class; also the top-1 image's colour+shape accuracy.  ``embed_*`` return L2-normalised arrays."""
    rng = np.random.default_rng([HELD_OUT_SEED + seed, 1])
    specs = [world.sample_spec(rng, colour=c, shape=s, background=b) for c, s, b in VISUAL_CLASSES
             for _ in range(per_class)]
    img = np.asarray(embed_images([world.render_first_frame(s, size=image_size) for s in specs]))
    queries = [world.sample_spec(rng, colour=c, shape=s, background=b) for c, s, b in VISUAL_CLASSES]
    txt = np.asarray(embed_texts([world.caption(q) for q in queries]))
    order = np.argsort(-(txt @ img.T), axis=1)
    cls = np.repeat(np.arange(len(VISUAL_CLASSES)), per_class)
    hit = cls[order] == np.arange(len(VISUAL_CLASSES))[:, None]
    top1 = [specs[j] for j in order[:, 0]]
    cs = np.mean([(a.colour, a.shape) == (q.colour, q.shape) for a, q in zip(top1, queries)])
    return {"recall@1": float(hit[:, 0].mean()), "recall@5": float(hit[:, :5].any(1).mean()),
            "top1_colour_shape": float(cs), "queries": len(queries), "images": len(specs)}


def evaluate_retrieval(index, n: int = 500, seed: int = 0, analyse_pixels: bool = True) -> dict[str, Any]:
    """Held-out world captions (``n`` sampled specs, an rng stream training never uses) against a gallery index:
    is the top-1 image's colour and shape right?  Judged by the gallery's stored captions (world grammar) and,
    with ``analyse_pixels``, also by analysing the retrieved image (``world.find_shape``/``classify_*``)."""
    from PIL import Image

    rng = np.random.default_rng([HELD_OUT_SEED + seed, 2])
    queries = [world.sample_spec(rng) for _ in range(n)]
    q = index.embedder.embed_texts([world.caption(s) for s in queries])
    _, ids = index.search_vectors(q, 1)
    ok_c = ok_s = ok_cs = ok_bg = ok_px = 0
    cache: dict[int, tuple] = {}
    for spec, i in zip(queries, ids[:, 0].tolist()):
        got = world.parse_caption(index.entries[i]["caption"])
        ok_c += got["colour"] == spec.colour
        ok_s += got["shape"] == spec.shape
        ok_cs += (got["colour"], got["shape"]) == (spec.colour, spec.shape)
        ok_bg += got["background"] == spec.background
        if analyse_pixels:
            if i not in cache:
                frame = np.asarray(Image.open(index.resolve(index.entries[i]["path"])).convert("RGB"))
                found = world.find_shape(frame)
                cache[i] = (world.classify_colour(found["colour"]) if found["colour"] is not None else None,
                            world.classify_shape(found["mask"]))
            ok_px += cache[i] == (spec.colour, spec.shape)
    out = {"n": n, "top1_colour_shape": ok_cs / n, "top1_colour": ok_c / n, "top1_shape": ok_s / n,
           "top1_background": ok_bg / n, "gallery": len(index)}
    if analyse_pixels:
        out["top1_colour_shape_by_pixels"] = ok_px / n
    return out


def _quick_eval(model, tokenizer, mean, std, image_size: int) -> dict[str, float]:
    was = model.training
    model.eval()
    try:
        r = text_image_recall(
            lambda ims: model.encode_image(images_to_tensor(ims, mean, std), normalize=True).numpy(),
            lambda caps: model.encode_text(tokenizer(caps), normalize=True).numpy(),
            image_size=image_size, per_class=2, seed=0)
    finally:
        model.train(was)
    return r


# ------------------------------------------------------------------------------------------------ export
def export(model: nn.Module, cfg: dict[str, Any], out_dir: str | Path, metrics: dict[str, Any] | None = None) -> Path:
    """Write ``open_clip_config.json`` + ``open_clip_model.safetensors`` (+ ``metrics.json``) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_clip_safetensors(full_state_dict(model), out / CLIP_WEIGHTS_FILE,
                          metadata={"format": "open_clip state dict", "trainer": "magic_demo.train.clip"})
    mean, std = _normalize_params_from_cfg()
    (out / CLIP_CONFIG_FILE).write_text(json.dumps(
        {"model_cfg": cfg, "preprocess_cfg": {"mean": mean, "std": std, "interpolation": "bicubic",
                                              "resize_mode": "shortest"}}, indent=1) + "\n")
    if metrics is not None:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return out


def _normalize_params_from_cfg():
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    return list(OPENAI_DATASET_MEAN), list(OPENAI_DATASET_STD)


# ------------------------------------------------------------------------------------------------ training
def save_checkpoint(path: Path, model, opt, step: int, elapsed: float, cfg: dict, args: dict, best: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "elapsed_s": elapsed,
                "config": json.dumps(cfg), "args": json.dumps(args), "best": json.dumps(best)}, tmp)
    tmp.replace(path)


def train(out: str | Path, *, config: str | dict = "mini", steps: int = 6000, minutes: float | None = None,
          max_new_steps: int | None = None, batch: int = 96, lr: float = 1e-3, weight_decay: float = 0.05,
          warmup: int = 200, seed: int = 0, ckpt_minutes: float = 3.0, eval_every: int = 250,
          export_dir: str | Path | None = None, progress: bool = True, log_every: int = 50) -> dict[str, Any]:
    """Train (or resume from ``<out>/ckpt_latest.pt``) until ``steps`` total, ``minutes`` of wall time in this call,
    or ``max_new_steps`` in this call.  Returns a summary; exports to ``export_dir`` at the end if given."""
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "ckpt_latest.pt"
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True) if ckpt_path.is_file() else None
    if state is not None:
        config = json.loads(state["config"])  # the checkpoint's architecture wins
    model, preprocess, tokenizer, cfg = build_model(config, seed=seed)
    mean, std = _normalize_params(preprocess)
    image_size = int(cfg["vision_cfg"]["image_size"])
    opt = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    step, elapsed, best = 0, 0.0, {}
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, elapsed, best = int(state["step"]), float(state["elapsed_s"]), json.loads(state["best"])
        print(f"resumed from {ckpt_path} at step {step} ({elapsed / 60:.1f} min trained)", flush=True)
    run_args = {"config": cfg, "steps": steps, "batch": batch, "lr": lr, "weight_decay": weight_decay,
                "warmup": warmup, "seed": seed}
    model.train()
    t_start = time.time()
    t_ckpt = t_start
    start_step = step
    log = open(out / "log.jsonl", "a")
    bar = tqdm(total=steps, initial=step, desc="clip", unit="step", disable=not progress, mininterval=5)
    losses: list[float] = []
    try:
        while step < steps:
            if minutes is not None and time.time() - t_start >= minutes * 60:
                break
            if max_new_steps is not None and step - start_step >= max_new_steps:
                break
            for g in opt.param_groups:
                g["lr"] = lr_at(step, lr, warmup, steps)
            images, caps, _ = make_batch(step, seed, batch, image_size)
            img = model.encode_image(images_to_tensor(images, mean, std), normalize=True)
            txt = model.encode_text(tokenizer(caps), normalize=True)
            loss = clip_loss(img, txt, model.logit_scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            step += 1
            losses.append(loss.item())
            bar.update(1)
            now = time.time()
            if step % log_every == 0 or step == steps:
                rec = {"step": step, "loss": float(np.mean(losses[-log_every:])), "lr": opt.param_groups[0]["lr"],
                       "logit_scale": model.logit_scale.exp().item(), "train_min": (elapsed + now - t_start) / 60}
                if eval_every and step % eval_every == 0:
                    rec.update({f"heldout_{k}": v for k, v in _quick_eval(model, tokenizer, mean, std,
                                                                         image_size).items()})
                log.write(json.dumps(rec) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{rec['loss']:.3f}", r1=f"{rec.get('heldout_recall@1', float('nan')):.2f}")
                if not progress:
                    print(json.dumps(rec), flush=True)
            if now - t_ckpt >= ckpt_minutes * 60:
                save_checkpoint(ckpt_path, model, opt, step, elapsed + now - t_start, cfg, run_args, best)
                t_ckpt = now
    finally:
        bar.close()
        log.close()
    elapsed += time.time() - t_start
    if step > start_step or state is None:
        save_checkpoint(ckpt_path, model, opt, step, elapsed, cfg, run_args, best)
    summary = {"step": step, "train_minutes": round(elapsed / 60, 2), "last_loss": losses[-1] if losses else None,
               "config": cfg, "batch": batch, "threads": torch.get_num_threads()}
    if export_dir is not None:
        summary["heldout"] = _quick_eval(model, tokenizer, mean, std, image_size)
        export(model, cfg, export_dir, metrics=summary)
        print(f"exported to {export_dir}: {json.dumps(summary['heldout'])}", flush=True)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m magic_demo.train.clip", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/clip", help="checkpoint folder (resumes from ckpt_latest.pt)")
    p.add_argument("--export", default=str(MINI_CLIP_DIR), help="where to write the exported model")
    p.add_argument("--no-export", action="store_true")
    p.add_argument("--config", default="mini", choices=sorted(CONFIGS))
    p.add_argument("--steps", type=int, default=6000, help="total steps (lr schedule length)")
    p.add_argument("--minutes", type=float, default=None, help="stop after this many minutes in this run")
    p.add_argument("--max-new-steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=96)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-minutes", type=float, default=3.0)
    p.add_argument("--eval-every", type=int, default=250, help="quick held-out recall every N steps (a log step)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--eval-only", action="store_true",
                   help="evaluate the exported model (--export) and, with --index, its gallery index")
    p.add_argument("--index", default=None, help="gallery index to evaluate (e.g. assets/gallery_index)")
    p.add_argument("--eval-n", type=int, default=500)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.eval_only:
        from magic_demo.retrieval import RetrievalIndex

        emb = ClipEmbedder(ClipModelSpec.mini(args.export))
        from PIL import Image

        res = {"text_image": text_image_recall(
            lambda ims: emb.embed_images([Image.fromarray(i) for i in ims]), emb.embed_texts, per_class=5)}
        if args.index:
            res["gallery"] = evaluate_retrieval(RetrievalIndex.load(args.index), n=args.eval_n)
        print(json.dumps(res, indent=1))
        return 0
    summary = train(args.out, config=args.config, steps=args.steps, minutes=args.minutes,
                    max_new_steps=args.max_new_steps, batch=args.batch, lr=args.lr, warmup=args.warmup,
                    seed=args.seed, ckpt_minutes=args.ckpt_minutes, eval_every=args.eval_every,
                    log_every=args.log_every, export_dir=None if args.no_export else args.export, progress=not args.no_progress)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
