"""Quality of the miniature models, measured on the procedural world (shape found by colour, centroid per
frame, motion class): what `python -m magic_demo eval` prints and training logs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from magic_demo import world


@dataclass
class I2VScore:
    clips: int
    motion_accuracy: float  # motion class of the generated clip == the prompt's
    colour_kept: float  # fraction of frames whose shape colour class == the prompt's
    shape_kept: float  # fraction of frames whose shape class == the prompt's
    present: float  # fraction of frames where a shape is found

    def as_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in self.__dict__.items()}


AREA_RANGE = (0.005, 0.3)  # fraction of the frame a world shape can cover; noise or a smear falls outside


def shape_present(found: dict, frame_pixels: int) -> bool:
    return AREA_RANGE[0] <= found["area"] / frame_pixels <= AREA_RANGE[1]


def colour_kept(found: dict, frame_pixels: int, colour: str) -> bool:
    return shape_present(found, frame_pixels) and world.classify_colour(found["colour"]) == colour


def shape_kept(found: dict, frame_pixels: int, shape: str) -> bool:
    return shape_present(found, frame_pixels) and world.classify_shape(found["mask"]) == shape


def held_out_specs(n: int, seed: int = 10_000) -> list[world.ClipSpec]:
    """Held-out clips (seeds far from the training stream), cycling through the motions evenly."""
    motions = list(world.MOTIONS)
    return [world.sample_spec(np.random.default_rng([seed, i]), motion=motions[i % len(motions)]) for i in range(n)]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return 99.0 if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def clip_metrics(clip: np.ndarray, spec: world.ClipSpec, fps: int, first_frame: np.ndarray | None = None) -> dict:
    """Per-clip measurements (Table 1's columns): motion class right, dynamic degree (mean centroid speed, frame
    widths per second), colour / shape kept and shape present (fractions of frames), motion smoothness (mean
    centroid acceleration, pixels per frame^2: lower is smoother), temporal flicker (mean absolute change of
    background pixels between frames, 0-255) and, given the conditioning image, first-frame PSNR (dB)."""
    bg = np.asarray(spec.bg_rgb, np.float32)
    pixels = clip.shape[1] * clip.shape[2]
    found = [world.find_shape(f, bg) for f in clip]
    ok = [shape_present(d, pixels) for d in found]
    cents = [d["centroid"] if o else None for d, o in zip(found, ok)]
    steps = [np.subtract(b, a) for a, b in zip(cents, cents[1:]) if a is not None and b is not None]
    speed = float(np.mean([np.hypot(*s) for s in steps])) * fps / clip.shape[2] if steps else 0.0
    accel = [np.hypot(*(np.subtract(c, b) - np.subtract(b, a))) for a, b, c in zip(cents, cents[1:], cents[2:])
             if a is not None and b is not None and c is not None]
    frames = clip.astype(np.float32)
    still = [~(found[t]["mask"] | found[t + 1]["mask"]) for t in range(len(clip) - 1)]
    flicker = [np.abs(frames[t + 1] - frames[t])[m].mean() for t, m in enumerate(still) if m.any()]
    out = {
        "motion_ok": float(world.classify_motion(cents, clip.shape[2], fps) == spec.motion),
        "dynamic_degree": speed,
        "colour_kept": float(np.mean([colour_kept(d, pixels, spec.colour) for d in found])),
        "shape_kept": float(np.mean([shape_kept(d, pixels, spec.shape) for d in found])),
        "present": float(np.mean(ok)),
        "acceleration": float(np.mean(accel)) if accel else float("nan"),
        "flicker": float(np.mean(flicker)) if flicker else 0.0,
    }
    if first_frame is not None:
        out["first_frame_psnr"] = psnr(clip[0], first_frame)
    return out


def score_clips(clips: list[np.ndarray], specs: list[world.ClipSpec], fps: int) -> I2VScore:
    m = [clip_metrics(c, s, fps) for c, s in zip(clips, specs)]
    mean = lambda key: float(np.mean([x[key] for x in m]))  # noqa: E731
    return I2VScore(len(clips), mean("motion_ok"), mean("colour_kept"), mean("shape_kept"), mean("present"))


@torch.inference_mode()
def text_to_video_clip(pipe, prompt: str, num_frames: int, steps: int, seed: int, size: int,
                       guidance_scale: float = 1.0) -> np.ndarray:
    """The paper's T2V setting on the I2V model (Fig. 5): no image latent, no mask, the VLM shown a neutral
    image, exactly as `encode_batch(text_only=...)` trains it."""
    from magic_demo.pipeline import neutral_image

    embeds = pipe.encode_prompt(prompt, neutral_image((size, size)))
    geom = pipe.geometry
    side = size // geom.spatial_ratio
    condition = torch.zeros(1, geom.channels + 1, geom.latent_frames(num_frames), side, side)
    latents = pipe.denoise(condition, embeds.select(0), steps, torch.Generator().manual_seed(seed), guidance_scale)
    return pipe.decode(latents).numpy()


@torch.inference_mode()
def generate_eval_clips(pipe, specs: list[world.ClipSpec], steps: int, num_frames: int = 17, size: int = 64,
                        seed: int = 0, guidance_scale: float = 1.0, true_cfg_scale: float = 1.0,
                        text_only: bool = False, colour_anchor: bool = False,
                        image_guidance_scale: float = 1.0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """One clip per spec (seed + index), from the spec's rendered first frame (or from text only); returns
    (clips, first frames). The model's raw frames unless `colour_anchor` (the app's post-process, which maps
    every frame's colours to the first frame's; not applicable from text only)."""
    clips, firsts = [], []
    for i, spec in enumerate(specs):
        first = world.render_first_frame(spec, size=size)
        if text_only:
            clip = text_to_video_clip(pipe, world.caption(spec), num_frames, steps, seed + i, size, guidance_scale)
        else:
            clip = pipe(Image.fromarray(first), world.caption(spec), num_frames=num_frames, steps=steps,
                        seed=seed + i, guidance_scale=guidance_scale, true_cfg_scale=true_cfg_scale,
                        colour_anchor=colour_anchor, image_guidance_scale=image_guidance_scale).numpy()
        clips.append(clip)
        firsts.append(first)
    return clips, firsts


def evaluate_i2v(pipe, n: int = 10, steps: int = 4, num_frames: int = 17, fps: int = 8, seed: int = 0,
                 size: int = 64, guidance_scale: float = 1.0, true_cfg_scale: float = 1.0,
                 text_only: bool = False, colour_anchor: bool = False, image_guidance_scale: float = 1.0) -> I2VScore:
    """Generate one clip per held-out first frame + caption and score motion, colour and shape (the model's raw
    frames unless `colour_anchor`, see generate_eval_clips)."""
    specs = held_out_specs(n)
    clips, _ = generate_eval_clips(pipe, specs, steps, num_frames, size, seed, guidance_scale, true_cfg_scale,
                                   text_only, colour_anchor, image_guidance_scale)
    return score_clips(clips, specs, fps)


def evaluate_first_frame_routes(pipe, routes: dict, n: int = 20, steps: int = 4, num_frames: int = 17, fps: int = 8,
                                guidance_scale: float = 1.0, true_cfg_scale: float = 1.0,
                                colour_anchor: bool = True, image_guidance_scale: float = 1.0) -> dict:
    """Caption in, video out, as in the app: for each held-out caption, the first frame comes from each route
    (`routes[name](caption, index) -> PIL image`: retrieved from the gallery, generated by the T2I model, ...),
    then one clip is made with the caption. Scored against the caption, with the background measured on the
    first frame (a retrieved or generated frame has its own shade). Returns per-route mean motion right,
    colour kept, shape kept and present. The colour anchor is on by default, as in the app."""
    specs = held_out_specs(n, seed=30_000)
    results = {}
    for name, first_frame in routes.items():
        rows = []
        for i, spec in enumerate(specs):
            text = world.caption(spec)
            first = first_frame(text, i).convert("RGB")
            clip = pipe(first, text, num_frames=num_frames, steps=steps, seed=i, guidance_scale=guidance_scale,
                        true_cfg_scale=true_cfg_scale, colour_anchor=colour_anchor,
                        image_guidance_scale=image_guidance_scale).numpy()
            target = world.ClipSpec(spec.shape, spec.colour, spec.motion, spec.background,
                                    bg_rgb=tuple(world.estimate_background(np.asarray(first))))
            rows.append(clip_metrics(clip, target, fps))
        results[name] = {"clips": n, **{k: round(float(np.mean([r[k] for r in rows])), 4)
                                        for k in ("motion_ok", "colour_kept", "shape_kept", "present")}}
    return results


def evaluate_long_video(pipe, seconds: float = 60.0, fps: int = 8, window_frames: int = 17, n: int = 2,
                        steps: int = 4, size: int = 64, out_dir: str = "outputs/eval", guidance_scale: float = 1.0,
                        true_cfg_scale: float = 1.0, colour_anchor: bool = True, spec_seed: int = 20_000,
                        image_guidance_scale: float = 1.0) -> dict:
    """Sliding-window videos (default one minute) from `held_out_specs(n, seed=spec_seed)`, read back from the written
    mp4s: fraction of frames where the shape is present, where it is present with the prompt's colour class, and
    where it is present with the prompt's shape class; per video these three, its caption, frame count, wall time
    and path; and shape kept per sliding window (`shape_kept_by_window`: the frames each window added), averaged
    as `shape_kept_first_window` and `shape_kept_later_windows` (what chaining costs)."""
    from pathlib import Path

    from magic_demo.video import VideoRequest, generate_video
    from magic_demo.video_io import read_video
    from magic_demo.windows import plan_windows

    kept, shaped, present, reports, first_window, later_windows = [], [], [], [], [], []
    for i, spec in enumerate(held_out_specs(n, seed=spec_seed)):
        image = Image.fromarray(world.render_first_frame(spec, size=size))
        req = VideoRequest(image=image, prompt=world.caption(spec), seconds=seconds, fps=fps, steps=steps, seed=i,
                           window_frames=window_frames, guidance_scale=guidance_scale, true_cfg_scale=true_cfg_scale,
                           colour_anchor=colour_anchor, image_guidance_scale=image_guidance_scale)
        done = generate_video(pipe, req, Path(out_dir) / f"long_{i}.mp4")
        frames, _ = read_video(done.video_path)
        bg = np.asarray(spec.bg_rgb, np.float32)
        pixels = frames.shape[1] * frames.shape[2]
        found = [world.find_shape(f, bg) for f in frames]
        present.append(np.mean([shape_present(d, pixels) for d in found]))
        kept.append(np.mean([colour_kept(d, pixels, spec.colour) for d in found]))
        frame_shaped = np.array([shape_kept(d, pixels, spec.shape) for d in found])
        shaped.append(frame_shaped.mean())
        plans = plan_windows(len(frames), window_frames, req.overlap, pipe.geometry.temporal_ratio)
        by_window = [frame_shaped[(p.start + 1 if p.index else 0):p.end].mean() for p in plans]
        first_window.append(by_window[0])
        later_windows.append(frame_shaped[plans[0].end:].mean() if len(plans) > 1 else np.nan)
        reports.append({"caption": world.caption(spec), "frames": len(frames), "wall_s": done.report["wall_s"],
                        "colour_kept": round(float(kept[-1]), 4), "shape_kept": round(float(shaped[-1]), 4),
                        "present": round(float(present[-1]), 4),
                        "shape_kept_by_window": [round(float(x), 3) for x in by_window], "video": str(done.video_path)})
    return {"videos": n, "seconds": seconds, "steps": steps, "colour_anchor": colour_anchor,
            "colour_kept": round(float(np.mean(kept)), 4), "shape_kept": round(float(np.mean(shaped)), 4),
            "present": round(float(np.mean(present)), 4),
            "shape_kept_first_window": round(float(np.mean(first_window)), 4),
            "shape_kept_later_windows": round(float(np.nanmean(later_windows)), 4) if len(plans) > 1 else None,
            "runs": reports}


def contact_sheet(videos: list[np.ndarray], every: int = 4, max_frames: int = 12, scale: int = 2) -> Image.Image:
    """One row per video, every `every`-th frame, nearest-neighbour upscaled: the README's figures."""
    rows = []
    for frames in videos:
        picked = frames[::every][:max_frames]
        row = np.concatenate(list(picked), axis=1)
        pad = max_frames * frames.shape[2] - row.shape[1]
        rows.append(np.pad(row, ((0, 2), (0, max(pad, 0)), (0, 0)), constant_values=255))
    sheet = np.concatenate(rows, axis=0)
    return Image.fromarray(sheet).resize((sheet.shape[1] * scale, sheet.shape[0] * scale), Image.NEAREST)
