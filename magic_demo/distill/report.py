"""Table 1 and Fig. 5 of the paper, at miniature scale: what `python -m magic_demo eval --what table1 fig5` writes.

Table 1 compares the teacher sampled with Euler at 56, 28, 16, 8 and 4 steps against the DMD2 students at 8 and
4 steps, on held-out first frames and prompts, several seeds each, with the measurements of
`evaluate.clip_metrics`. A first row scores the rendered ground-truth clips themselves: the reference every
model row should approach (their motion is always right; their flicker is near 0, from anti-aliased edges).

Fig. 5 puts the distillation curves (metric vs iteration, the runner's curve.json) of the image-conditioned
(TI2V) and text-only (T2V) DMD2 runs on one plot.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from magic_demo import world
from magic_demo.evaluate import clip_metrics, generate_eval_clips, held_out_specs

TEACHER_STEPS = (56, 28, 16, 8, 4)
# (key in clip_metrics, column title, scale, better)
COLUMNS = (
    ("motion_ok", "motion direction acc. (%)", 100.0, "higher"),
    ("dynamic_degree", "dynamic degree (widths/s)", 1.0, "closer to data"),
    ("subject", "subject consistency (%)", 100.0, "higher"),
    ("acceleration", "motion smoothness: accel. (px/frame^2)", 1.0, "lower"),
    ("flicker", "temporal flicker (0-255)", 1.0, "lower"),
    ("first_frame_psnr", "first-frame PSNR (dB)", 1.0, "higher"),
)


@dataclass(frozen=True)
class Setting:
    name: str
    pipe: object  # a MagicI2VPipeline, or None for the rendered ground truth
    steps: int = 4
    guidance_scale: float = 1.0  # input of a CFG-distilled transformer
    true_cfg_scale: float = 1.0  # two-pass CFG (the teacher)


def summarise(metrics: list[dict]) -> dict:
    """Mean of each column over clips; subject consistency = mean of colour kept and shape kept."""
    row = {}
    for key, *_ in COLUMNS:
        if key == "subject":
            values = [(m["colour_kept"] + m["shape_kept"]) / 2 for m in metrics]
        else:
            values = [m[key] for m in metrics if key in m and not math.isnan(m[key])]
        row[key] = float(np.mean(values)) if values else float("nan")
    row["clips"] = len(metrics)
    return row


def table1(settings: list[Setting], prompts: int = 20, seeds: int = 2, num_frames: int = 17, fps: int = 8,
           size: int = 64, progress=print) -> list[dict]:
    """One row per setting: every held-out prompt (with its first frame) sampled with `seeds` seeds."""
    specs = held_out_specs(prompts)
    rows = []
    for setting in settings:
        metrics = []
        for s in range(seeds):
            if setting.pipe is None:
                clips = [world.render_clip(spec, num_frames, size, fps) for spec in specs]
                firsts = [c[0] for c in clips]
            else:
                clips, firsts = generate_eval_clips(setting.pipe, specs, setting.steps, num_frames, size,
                                                    seed=1000 * s, guidance_scale=setting.guidance_scale,
                                                    true_cfg_scale=setting.true_cfg_scale)
            metrics += [clip_metrics(c, spec, fps, first) for c, spec, first in zip(clips, specs, firsts)]
            if setting.pipe is None:
                break  # the ground truth does not depend on a seed
        rows.append({"setting": setting.name, "steps": setting.steps, **summarise(metrics)})
        progress(f"{setting.name}: {json.dumps({k: round(v, 3) for k, v in rows[-1].items() if isinstance(v, float)})}")
    return rows


def markdown_table(rows: list[dict]) -> str:
    head = "| setting | " + " | ".join(title for _, title, *_ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for row in rows:
        cells = []
        for key, _, scale, _ in COLUMNS:
            v = row.get(key, float("nan"))
            cells.append("-" if math.isnan(v) else f"{v * scale:.1f}" if scale == 100 else f"{v:.3g}")
        lines.append(f"| {row['setting']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(curves: dict[str, list[dict]], path: str | Path, metrics=("motion_accuracy", "colour_kept"),
                title: str = "DMD2 on TI2V vs T2V (miniature)") -> Path:
    """Fig. 5: each metric vs distillation iteration, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4))
    for ax, metric in zip(np.atleast_1d(axes), metrics):
        for name, curve in curves.items():
            ax.plot([p["iter"] for p in curve], [p[metric] for p in curve], marker="o", ms=3, label=name)
        ax.set_xlabel("distillation iteration")
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load_curve(path: str | Path) -> list[dict]:
    curve = json.loads(Path(path).read_text())
    if not isinstance(curve, list) or not all("iter" in p for p in curve):
        raise ValueError(f"{path} is not a distillation curve (a list of points with 'iter')")
    return curve


def write_table1(rows: list[dict], out_dir: str | Path, note: Optional[str] = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table1.json").write_text(json.dumps(rows, indent=1))
    text = markdown_table(rows) + ("\n\n" + note if note else "") + "\n"
    (out / "table1.md").write_text(text)
    return out / "table1.md"
