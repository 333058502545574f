"""Engine benchmarks (issue 8). Prints measured figures; not a test. Run on an otherwise idle machine:

    .venv/bin/python bench/bench_engine.py --preset mini --threads 2 [--only minute,alt,memory,int8,scaling,app]

1. minute: 60 s of video at the preset's fps/size, int8: wall time, per-window time, first window, s/s.
2. alt: the obvious alternative on the same weights and the same frames, measured alternately (A B A B):
   clip by clip, each clip encoding its prompt again (padded to full length, as diffusers does), 50 Euler steps
   with true CFG (two forwards per step). (diffusers' own HunyuanVideoImageToVideoPipeline cannot run the
   miniature weights: it parses the Llama-3 chat template by token ids and needs a temporally compressing VAE,
   so the same work is done through our pipeline's components, following its steps.)
3. memory: peak RSS of 60 s vs 5 s of video, each in a fresh process.
4. int8: weight bytes, one-window speed and output difference, int8 vs fp32 (vs bf16 where it runs).
5. app: cold start to a ready server; Generate click to the first window (gradio_client) vs the engine.
6. scaling: wall time for 5, 15, 30, 60 s and the fitted per-second cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from magic_demo import world  # noqa: E402
from magic_demo.presets import get_preset, load_pipeline  # noqa: E402
from magic_demo.quantize import weight_bytes  # noqa: E402
from magic_demo.video import VideoRequest, generate_video  # noqa: E402

PROMPT = "a red circle moves left on a black background"


def first_frame(size: int) -> Image.Image:
    spec = world.sample_spec(np.random.default_rng(7), shape="circle", colour="red", motion="moves left",
                             background="black")
    return Image.fromarray(world.render_first_frame(spec, size=size))


def request(preset, seconds, **kw) -> VideoRequest:
    return VideoRequest(image=first_frame(preset.width), prompt=PROMPT, seconds=seconds, fps=preset.fps,
                        steps=preset.steps, seed=0, window_frames=preset.window_frames,
                        guidance_scale=preset.guidance_scale, **kw)


def run(pipe, preset, seconds, out_dir) -> dict:
    return generate_video(pipe, request(preset, seconds), Path(out_dir) / f"v{seconds}.mp4").report


def bench_minute(pipe, preset, out_dir) -> dict:
    r = run(pipe, preset, 60.0, out_dir)
    return {"video_s": r["seconds"], "frames": r["frames"], "windows": r["windows"], "wall_s": r["wall_s"],
            "first_window_s": r["time_to_first_window_s"], "median_window_s": statistics.median(r["per_window_s"]),
            "compute_s_per_video_s": r["compute_s_per_video_s"], "peak_rss_mb": r["peak_rss_mb"]}


def padded_like_the_stock_pipeline(pipe, embeds):
    """diffusers' pipeline pads the prompt to the template's full length and masks the padding, and its transformer
    still runs over every position; our encode_prompt drops that padding (an optimisation of ours), so the
    alternative puts it back: zeros, masked out, the template's length."""
    tpl = pipe.prompt_template
    length = pipe.text_encoder.config.image_seq_length // tpl.image_token_stride + tpl.max_prompt_tokens + 1
    pad = length - embeds.embeds.shape[1]
    b, _, dim = embeds.embeds.shape
    return dataclasses.replace(embeds, embeds=torch.cat([embeds.embeds, embeds.embeds.new_zeros(b, pad, dim)], 1),
                               mask=torch.cat([embeds.mask, embeds.mask.new_zeros(b, pad)], 1))


def alternative_clip_by_clip(pipe, preset, seconds) -> float:
    """Same frames as ours, clip by clip, as diffusers' HunyuanVideoImageToVideoPipeline does each clip: encode the
    prompt (+ an empty negative) padded to full length, encode the image, 50 Euler steps with true CFG (two forwards
    per step), decode."""
    total, image = int(round(seconds * preset.fps)), first_frame(preset.width)
    t0, made = time.perf_counter(), 0
    while made < total:
        embeds = padded_like_the_stock_pipeline(pipe, pipe.encode_prompt(PROMPT, image, negative_prompt=""))
        condition = pipe.prepare_condition(pipe.encode_image(image), pipe.geometry.latent_frames(preset.window_frames))
        latents = pipe.denoise(condition, embeds.select(0), 50, torch.Generator().manual_seed(made),
                               true_cfg_scale=5.0, negative=embeds.select(1))
        frames = pipe.decode(latents)
        image = Image.fromarray(frames[-1].numpy())
        made += len(frames) - (1 if made else 0)
    return time.perf_counter() - t0


def bench_alternative(pipes, preset, out_dir, lengths=(6.0, 60.0), rounds=2) -> dict:
    """Per video length: ours (each variant) and the alternative, alternately (A B A B), ratio of medians."""
    return {f"{seconds:g}s": alternative_ab(pipes, preset, out_dir, seconds, rounds) for seconds in lengths}


def alternative_ab(pipes, preset, out_dir, seconds, rounds) -> dict:
    """The alternative always runs the eager pipeline."""
    ours, alt = {name: [] for name in pipes}, []
    for _ in range(rounds):  # A B A B (A: each of our variants)
        for name, pipe in pipes.items():
            ours[name].append(run(pipe, preset, seconds, out_dir)["wall_s"])
        alt.append(alternative_clip_by_clip(pipes["eager"], preset, seconds))
    res = {"video_s": seconds, "ours_s": ours["eager"], "alternative_s": [round(a, 3) for a in alt],
           "speedup_of_medians": round(statistics.median(alt) / statistics.median(ours["eager"]), 1)}
    if "compiled" in ours:
        res["ours_compiled_s"] = ours["compiled"]
        res["speedup_of_medians_compiled"] = round(statistics.median(alt) / statistics.median(ours["compiled"]), 1)
    return res


def bench_memory(preset_name, threads) -> dict:
    code = ("import sys,json,torch; sys.path.insert(0,%r); torch.set_num_threads(%d);"
            "from bench.bench_engine import *; p=get_preset(%r); pipe=load_pipeline(p);"
            "import tempfile; print(json.dumps(run(pipe,p,float(sys.argv[1]),tempfile.mkdtemp())))")
    peaks = {}
    for seconds in (5, 60):
        out = subprocess.run([sys.executable, "-c", code % (str(ROOT), threads, preset_name), str(seconds)],
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        peaks[seconds] = json.loads(out)["peak_rss_mb"]
    return {"peak_rss_5s_mb": peaks[5], "peak_rss_60s_mb": peaks[60], "ratio": round(peaks[60] / peaks[5], 3)}


def bench_int8(preset, out_dir, rounds: int = 9) -> dict:
    """int8 vs fp32: one clip through `__call__` (text encoders included) and a 60 s video, alternately, medians."""
    res, frames, times, pipes = {}, {}, {}, {}
    for mode in ("none", "int8"):
        pipes[mode] = load_pipeline(preset, quantize=mode)
        res[mode] = {"weight_bytes": sum(weight_bytes(getattr(pipes[mode], n)) for n in
                                         ("transformer", "text_encoder", "text_encoder_2"))}
        times[mode] = []
    for i in range(rounds + 1):
        for mode in ("none", "int8"):
            t = time.perf_counter()
            frames[mode] = pipes[mode](first_frame(preset.width), PROMPT, num_frames=preset.window_frames,
                                       steps=preset.steps, seed=0, guidance_scale=preset.guidance_scale).float()
            if i:  # the first round warms up
                times[mode].append(time.perf_counter() - t)
    # The engine's own workload: a 60 s video (text encoders once, then 30 windows), alternately, medians.
    videos = {mode: [] for mode in pipes}
    for _ in range(3):
        for mode in ("none", "int8"):
            videos[mode].append(run(pipes[mode], preset, 60.0, out_dir)["wall_s"])
    for mode in ("none", "int8"):
        res[mode]["window_s"] = round(statistics.median(times[mode]), 4)
        res[mode]["video_60s_s"] = round(statistics.median(videos[mode]), 3)
    res["bytes_ratio_fp32_over_int8"] = round(res["none"]["weight_bytes"] / res["int8"]["weight_bytes"], 2)
    res["speed_ratio_int8_over_fp32"] = round(res["int8"]["window_s"] / res["none"]["window_s"], 3)
    res["video_ratio_int8_over_fp32"] = round(res["int8"]["video_60s_s"] / res["none"]["video_60s_s"], 3)
    res["mean_abs_diff_0_255"] = round(float((frames["none"] - frames["int8"]).abs().mean()), 3)
    return res


def bench_scaling(pipes, preset, out_dir, plot: str | None = None) -> dict:
    lengths = (5, 15, 30, 60)
    ours = {s: run(pipes["eager"], preset, float(s), out_dir)["wall_s"] for s in lengths}
    compiled = {s: run(pipes["compiled"], preset, float(s), out_dir)["wall_s"] for s in lengths} \
        if "compiled" in pipes else None
    alt = {s: round(alternative_clip_by_clip(pipes["eager"], preset, float(s)), 3) for s in lengths}
    xs, ys = np.array(lengths, float), np.array([ours[s] for s in lengths])
    slope, intercept = np.polyfit(xs, ys, 1)
    resid = ys - (slope * xs + intercept)
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
        ax.plot(lengths, [alt[s] for s in lengths], "o-", label="clip by clip, 50 steps + CFG")
        ax.plot(lengths, [ours[s] for s in lengths], "o-", label="ours: 4 steps, sliding window, int8")
        if compiled:
            ax.plot(lengths, [compiled[s] for s in lengths], "o-", label="ours, --compile")
        ax.plot(lengths, lengths, "k--", lw=0.8, label="real time (1 s per s of video)")
        ax.set_xlabel("video length (s)")
        ax.set_ylabel("wall time (s)")
        ax.set_title(f"{preset.name} preset, {os.cpu_count()}-core CPU")
        ax.legend()
        fig.tight_layout()
        fig.savefig(plot)
    res = {"ours_wall_s": ours, "alternative_wall_s": alt, "per_video_second_s": round(slope, 4),
           "intercept_s": round(intercept, 3), "max_residual_s": round(float(np.abs(resid).max()), 3)}
    if compiled:
        res["ours_compiled_wall_s"] = compiled
        res["per_video_second_s_compiled"] = round(np.polyfit(xs, [compiled[s] for s in lengths], 1)[0], 4)
    return res


def bench_app(preset_name, threads, rounds: int = 5) -> dict:
    from gradio_client import Client

    port = 7900 + os.getpid() % 50
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    outputs = Path(tempfile.mkdtemp())
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--preset", preset_name, "--port", str(port),
                             "--outputs", str(outputs)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if "Running on local URL" in line:
                break
        ready = time.perf_counter() - t0
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        preset = get_preset(preset_name)
        if True:
            # In the browser the chosen first frame already lives on the server when Generate is clicked (the
            # frame sources save it there): no upload is part of the click.
            img = outputs / "first_frame.png"
            first_frame(preset.width).save(img)
            on_server = {"path": str(img), "meta": {"_type": "gradio.FileData"}}
            clicks, engine = [], []
            for _ in range(1 + rounds):  # the first request on a fresh server, then warm ones
                t1 = time.perf_counter()
                job = client.submit(on_server, PROMPT, 10.0, preset.fps, preset.steps, 0, 0, api_name="/generate")
                first = None
                for out in job:
                    if isinstance(out[0], str) and first is None:
                        first = time.perf_counter() - t1
                clicks.append(first)
                engine.append(job.outputs()[-1][2]["time_to_first_window_s"])
        warm = statistics.median(clicks[1:]) / statistics.median(engine[1:])
        return {"cold_start_to_ready_s": round(ready, 2),
                "first_request": {"click_to_first_window_s": round(clicks[0], 3), "engine_first_window_s": engine[0],
                                  "ratio": round(clicks[0] / engine[0], 2)},
                "warm_median": {"click_to_first_window_s": round(statistics.median(clicks[1:]), 3),
                                "engine_first_window_s": round(statistics.median(engine[1:]), 4),
                                "ratio": round(warm, 2), "requests": rounds}}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mini")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default="minute,alt,memory,int8,scaling,app")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG of wall time vs video length (scaling section)")
    p.add_argument("--compile", action="store_true",
                   help="also measure ours with the transformer under torch.compile (minute, alt, scaling)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    preset = get_preset(args.preset)
    only = args.only.split(",")
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                          f"{torch.__version__}, {args.threads} threads", "preset": preset.name}
    out_dir = tempfile.mkdtemp()
    pipes = {}
    if {"minute", "alt", "scaling"} & set(only):
        pipes["eager"] = load_pipeline(preset, quantize="int8")
        if args.compile:
            pipes["compiled"] = load_pipeline(preset, quantize="int8", compile=True)
    for name, pipe in pipes.items():  # warm-up: every window length the sections use (a compile for each)
        t = time.perf_counter()
        for seconds in (4.0, 5.0, 15.0):
            run(pipe, preset, seconds, out_dir)
        print(f"warm-up {name}: {time.perf_counter() - t:.1f} s", flush=True)
    sections = {"minute": lambda: {name: bench_minute(p, preset, out_dir) for name, p in pipes.items()},
                "alt": lambda: bench_alternative(pipes, preset, out_dir),
                "memory": lambda: bench_memory(preset.name, args.threads),
                "int8": lambda: bench_int8(preset, out_dir),
                "scaling": lambda: bench_scaling(pipes, preset, out_dir, args.plot),
                "app": lambda: bench_app(preset.name, args.threads)}
    for name in only:
        t = time.perf_counter()
        results[name] = sections[name]()
        print(f"{name} ({time.perf_counter() - t:.0f} s): {json.dumps(results[name])}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
