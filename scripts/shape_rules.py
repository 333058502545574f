"""Compare the evaluator's shape rule with the one it replaced (session 14), on the `mini` preset's own clips.

    .venv/bin/python scripts/shape_rules.py --clips 200 --json docs/shape_rules.json --png docs/shape_rules.png

For every frame of `held_out_specs(clips)` (4 steps, colour anchor on, as the app makes them) in which the shape is
present, both rules name the shape: the old one by how much of its bounding box the mask fills, the current one
(`world.classify_shape`) by the best-overlapping world-shape template. Prints and writes the confusion of each rule
(spec shape -> named shape, fractions of frames) and saves a picture of frames on which the two rules disagree.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from PIL import Image, ImageDraw

from magic_demo import evaluate, world
from magic_demo.presets import get_preset, load_pipeline


def bbox_fill_shape(mask: np.ndarray) -> str:
    """The rule before session 14: circle / square / triangle from the mask's fill of its bounding box."""
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / float((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
    return "triangle" if fill < 0.65 else ("circle" if fill < 0.9 else "square")


def confusion(pairs: list[tuple[str, str]]) -> dict:
    out = {}
    for shape in world.SHAPES:
        named = [n for s, n in pairs if s == shape]
        out[shape] = {n: round(named.count(n) / len(named), 4) for n in world.SHAPES} if named else {}
    out["kept"] = round(float(np.mean([s == n for s, n in pairs])), 4)
    return out


def disagreement_picture(groups: dict, rows: int = 4, per_row: int = 10, seed: int = 0) -> Image.Image:
    """The largest groups of (spec, old rule, new rule) disagreements, one labelled strip each."""
    rng = np.random.default_rng(seed)
    strips = []
    for (spec, old, new), frames in sorted(groups.items(), key=lambda kv: -len(kv[1]))[:rows]:
        pick = [frames[j] for j in sorted(rng.choice(len(frames), min(per_row, len(frames)), replace=False))]
        pick += [np.zeros_like(frames[0])] * (per_row - len(pick))
        label = Image.new("RGB", (150, frames[0].shape[0]), "white")
        ImageDraw.Draw(label).text((4, 8), f"spec: {spec}\nold rule: {old}\nnew rule: {new}\n({len(frames)} frames)",
                                   fill="black")
        strips.append(np.concatenate([np.asarray(label)] + pick, axis=1))
    grid = np.concatenate(strips, axis=0)
    return Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="mini-x8")
    ap.add_argument("--clips", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--png", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(get_preset(args.preset))
    specs = evaluate.held_out_specs(args.clips)
    clips, _ = evaluate.generate_eval_clips(pipe, specs, steps=4, colour_anchor=True)
    old_pairs, new_pairs, groups = [], [], {}
    for clip, spec in zip(clips, specs):
        bg = np.asarray(spec.bg_rgb, np.float32)
        for frame in clip:
            found = world.find_shape(frame, bg)
            if not evaluate.shape_present(found, frame.shape[0] * frame.shape[1]):
                continue
            old, new = bbox_fill_shape(found["mask"]), world.classify_shape(found["mask"])
            old_pairs.append((spec.shape, old))
            new_pairs.append((spec.shape, new))
            if old != new:
                groups.setdefault((spec.shape, old, new), []).append(frame)
    report = {"preset": args.preset, "clips": args.clips, "frames_with_the_shape_present": len(new_pairs),
              "bbox_fill_rule": confusion(old_pairs), "template_rule": confusion(new_pairs),
              "disagreements": {f"{s}: old {o}, new {n}": len(v) for (s, o, n), v in
                                sorted(groups.items(), key=lambda kv: -len(kv[1]))}}
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.png and groups:
        disagreement_picture(groups).save(args.png)


if __name__ == "__main__":
    main()
