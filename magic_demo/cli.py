"""Command line: `python -m magic_demo generate ...` (and the subcommands other modules register)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from magic_demo.presets import DEFAULT_PRESET, PRESETS, QUANTIZE_MODES, get_preset


def _generate(args: argparse.Namespace) -> int:
    from PIL import Image

    from magic_demo.events import StepFinished, VideoFinished, VideoStarted, WindowFinished, WindowStarted
    from magic_demo.presets import load_pipeline
    from magic_demo.video import VideoRequest, generate_video

    preset = get_preset(args.preset)
    try:
        with Image.open(args.image) as im:
            image = im.convert("RGB")  # the first-frame module does the full upload checks
    except OSError as exc:
        raise ValueError(f"image {args.image!r} cannot be read: {exc}") from exc
    if image.size != (preset.width, preset.height):
        image = image.resize((preset.width, preset.height), Image.LANCZOS)
    req = VideoRequest(
        image=image, prompt=args.prompt, seconds=args.seconds if args.seconds is not None else preset.seconds,
        fps=args.fps or preset.fps, steps=args.steps or preset.steps, seed=args.seed,
        window_frames=args.window_frames or preset.window_frames, overlap=args.overlap, condition=args.condition,
        colour_anchor=not args.no_colour_anchor,
        guidance_scale=preset.guidance_scale if args.guidance_scale is None else args.guidance_scale,
        true_cfg_scale=preset.true_cfg_scale if args.true_cfg_scale is None else args.true_cfg_scale,
        image_guidance_scale=(preset.image_guidance_scale if args.image_guidance_scale is None
                              else args.image_guidance_scale), extra_report={"preset": preset.name})
    req.validate()  # fail before loading models
    pipe = load_pipeline(preset, quantize=args.quantize, compile=args.compile)
    bars: dict[str, tqdm] = {}

    def on_event(event) -> None:
        if isinstance(event, VideoStarted):
            bars["windows"] = tqdm(total=event.total_windows, desc="windows", unit="win", position=0, file=sys.stderr)
        elif isinstance(event, WindowStarted):
            bars["steps"] = tqdm(total=req.steps, desc=f"window {event.window}/{event.total_windows} steps",
                                 unit="step", position=1, leave=False, file=sys.stderr)
        elif isinstance(event, StepFinished):
            bars["steps"].update(1)
        elif isinstance(event, WindowFinished):
            bars["steps"].close()
            bars["windows"].update(1)
        elif isinstance(event, VideoFinished):
            for bar in bars.values():
                bar.close()

    done = generate_video(pipe, req, args.out, on_event=on_event)
    report = dict(done.report, quantize=args.quantize)
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("video_path", "frames", "windows", "wall_s", "compute_s_per_video_s")}))
    return 0


def _convert(args: argparse.Namespace) -> int:
    import torch

    from magic_demo.convert import convert_transformer, read_checkpoint

    config = json.loads(Path(args.config).read_text()) if args.config else None
    model, report = convert_transformer(read_checkpoint(args.checkpoint), config, allow_partial=args.allow_partial)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    model.to(dtype).save_pretrained(args.out, safe_serialization=True, max_shard_size="5GB")
    print(json.dumps({"out": args.out, "parameters": sum(p.numel() for p in model.parameters()), **report}))
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from magic_demo.presets import save_prequantized

    out = save_prequantized(args.preset, args.out)
    print(json.dumps({"out": str(out), "int8": sorted(p.name for p in Path(out).glob("*_int8"))}))
    return 0


TRAIN_STAGES = {"vae": "magic_demo.train.vae", "i2v": "magic_demo.train.i2v", "t2i": "magic_demo.train.t2i",
                "distill": "magic_demo.train.distill", "decoder": "magic_demo.train.decoder",
                "clip": "magic_demo.train.clip"}


def _train(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(TRAIN_STAGES[args.stage])
    module.main(args.stage_args)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from magic_demo import evaluate
    from magic_demo.presets import load_pipeline

    preset = get_preset(args.preset)
    results: dict = {"preset": preset.name}
    pipe = load_pipeline(preset, quantize=args.quantize) if {"i2v", "long"} & set(args.what) else None
    if "i2v" in args.what:
        # the model's raw frames, and the app's output (colour anchor on: every frame's colours mapped to the first's)
        for steps in args.steps:
            for anchor, suffix in ((False, ""), (True, "_colour_anchor")):
                results[f"i2v_{steps}_steps{suffix}"] = evaluate.evaluate_i2v(
                    pipe, n=args.clips, steps=steps, num_frames=preset.window_frames, fps=preset.fps,
                    size=preset.width, guidance_scale=preset.guidance_scale, true_cfg_scale=preset.true_cfg_scale,
                    colour_anchor=anchor, image_guidance_scale=preset.image_guidance_scale).as_dict()
    if "long" in args.what:
        # the preset's own sampler steps, and a folder per preset so two evals can run side by side
        results["long_video"] = evaluate.evaluate_long_video(pipe, seconds=args.seconds, fps=preset.fps,
                                                             window_frames=preset.window_frames, n=args.videos,
                                                             steps=preset.steps, size=preset.width,
                                                             out_dir=f"outputs/eval/{preset.name}",
                                                             guidance_scale=preset.guidance_scale,
                                                             true_cfg_scale=preset.true_cfg_scale,
                                                             image_guidance_scale=preset.image_guidance_scale)
        from magic_demo.video_io import read_video

        # README figure: one frame per second of the first 12 s of each long video
        videos = [read_video(r["video"])[0] for r in results["long_video"]["runs"]]
        Path(args.out).mkdir(parents=True, exist_ok=True)
        evaluate.contact_sheet(videos, every=preset.fps, max_frames=12).save(Path(args.out) / f"{preset.name}_samples.png")
    if "routes" in args.what:
        from magic_demo.service import DemoService

        service = DemoService(preset, quantize=args.quantize)
        routes = {"retrieved": lambda text, i: service.retrieve(text, k=1)[0].image,
                  "generated": lambda text, i: service.generate_first_frame(text, seed=i).image}
        results["routes"] = evaluate.evaluate_first_frame_routes(
            service.pipe, routes, n=args.clips, steps=preset.steps, num_frames=preset.window_frames, fps=preset.fps,
            guidance_scale=preset.guidance_scale, true_cfg_scale=preset.true_cfg_scale,
            image_guidance_scale=preset.image_guidance_scale)
    if "t2i" in args.what:
        from magic_demo.mini_t2i import evaluate_t2i

        t2i = preset.text_to_image()  # at the model's own generation settings (its generation.json)
        results["t2i"] = evaluate_t2i(t2i.pipe, n=args.clips * 5, seed=1234, num_inference_steps=t2i.num_inference_steps,
                                      guidance_scale=t2i.guidance_scale)
    if "retrieval" in args.what:
        from magic_demo.retrieval import RetrievalIndex
        from magic_demo.train.clip import evaluate_retrieval

        results["retrieval"] = evaluate_retrieval(RetrievalIndex.load(preset.gallery_index), n=args.clips * 5)
    if "table1" in args.what:
        results["table1"] = _table1(args)
    if "fig5" in args.what:
        from magic_demo.distill.report import load_curve, plot_curves

        curves = dict(_name_path(spec) for spec in args.curves)
        results["fig5"] = str(plot_curves({name: load_curve(path) for name, path in curves.items()},
                                          Path(args.out) / "fig5_dmd2_ti2v_vs_t2v.png"))
    text = json.dumps(results, indent=2, default=lambda o: o.__dict__ if hasattr(o, "__dict__") else str(o))
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


def _name_path(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--curves entries must read NAME=PATH, got {spec!r}")
    return name, path


def _table1(args: argparse.Namespace) -> list[dict]:
    """Teacher (Euler, its preset's CFG) at 56..4 steps vs the DMD2 students at 8 and 4 steps, + ground truth."""
    from magic_demo.distill.report import TEACHER_STEPS, Setting, table1, write_table1
    from magic_demo.presets import load_pipeline

    teacher, student8, student4 = (get_preset(n) for n in ("mini-x8-teacher", "mini-x8-8step", "mini-x8"))
    t_pipe = load_pipeline(teacher, quantize=args.quantize)
    settings = [Setting("data (rendered clips)", None, 0)]
    settings += [Setting(f"teacher Euler {n} steps, CFG {teacher.true_cfg_scale:g}", t_pipe, n,
                         true_cfg_scale=teacher.true_cfg_scale) for n in TEACHER_STEPS]
    for preset in (student8, student4):
        settings.append(Setting(f"DMD2 student {preset.steps} steps", load_pipeline(preset, quantize=args.quantize),
                                preset.steps, guidance_scale=preset.guidance_scale))
    rows = table1(settings, prompts=args.clips, seeds=args.seeds, num_frames=teacher.window_frames, fps=teacher.fps,
                  size=teacher.width, progress=lambda msg: print(msg, flush=True))
    note = (f"{args.clips} held-out prompts x {args.seeds} seeds, {teacher.window_frames} frames at "
            f"{teacher.width}x{teacher.height}, {args.quantize} weights (`python -m magic_demo eval --what table1`).")
    write_table1(rows, args.out, note)
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m magic_demo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="animate a first frame into a video")
    gen.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS))
    gen.add_argument("--image", required=True, help="first frame (PNG/JPEG/WebP)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--seconds", type=float, default=None, help="video length (default: the preset's)")
    gen.add_argument("--fps", type=int, default=None)
    gen.add_argument("--steps", type=int, default=None, help="sampler steps per window (default 4)")
    gen.add_argument("--seed", type=int, default=-1, help="-1 for random")
    gen.add_argument("--window-frames", type=int, default=None)
    gen.add_argument("--overlap", type=int, default=0, help="frames cross-faded between windows")
    gen.add_argument("--condition", default="last_frame", choices=["last_frame", "last_latent"])
    gen.add_argument("--no-colour-anchor", action="store_true",
                     help="keep the model's raw colours (no histogram match of every frame to frame 1)")
    gen.add_argument("--guidance-scale", type=float, default=None)
    gen.add_argument("--true-cfg-scale", type=float, default=None,
                     help="> 1 turns on classic two-pass CFG (default: the preset's)")
    gen.add_argument("--image-guidance-scale", type=float, default=None,
                     help="!= 1: one more pass per step, guided toward the first frame (default: the preset's; "
                          "1 turns it off)")
    gen.add_argument("--quantize", default="int8", choices=QUANTIZE_MODES)
    gen.add_argument("--compile", action="store_true",
                     help="torch.compile the transformer (faster windows; the first one compiles, ~30 s on CPU)")
    gen.add_argument("--out", default="outputs/video.mp4")
    gen.add_argument("--report", default=None, help="write a JSON report here")
    gen.set_defaults(func=_generate)

    conv = sub.add_parser("convert", help="original Magic 1-For-1 / HunyuanVideo DiT checkpoint -> diffusers folder")
    conv.add_argument("--from", dest="source", choices=["magic141"], required=True)
    conv.add_argument("checkpoint", help=".pth (loaded with weights_only=True) or .safetensors")
    conv.add_argument("--out", required=True)
    conv.add_argument("--config", default=None, help="transformer config JSON (default: the Magic 1-For-1 DiT)")
    conv.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    conv.add_argument("--allow-partial", action="store_true", help="load even with missing/unexpected keys")
    conv.set_defaults(func=_convert)

    quant = sub.add_parser("quantize", help="save a preset with int8 transformer and text encoders")
    quant.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS))
    quant.add_argument("--out", required=True)
    quant.set_defaults(func=_quantize)

    train = sub.add_parser("train", help="train a miniature model (arguments after the stage go to its trainer)")
    train.add_argument("stage", choices=sorted(TRAIN_STAGES))
    train.add_argument("stage_args", nargs=argparse.REMAINDER)
    train.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="quality of a preset's models on the procedural world")
    ev.add_argument("--preset", default="mini", choices=sorted(PRESETS))
    ev.add_argument("--what", nargs="+", default=["i2v", "long", "t2i", "retrieval"],
                    choices=["i2v", "long", "t2i", "retrieval", "routes", "table1", "fig5"],
                    help="routes: caption -> retrieved / generated first frame -> video, as in the app; "
                         "table1/fig5: the paper's distillation comparison at miniature scale (written to --out)")
    ev.add_argument("--steps", nargs="+", type=int, default=[4, 50], help="sampler steps for the i2v figures")
    ev.add_argument("--clips", type=int, default=20)
    ev.add_argument("--videos", type=int, default=2, help="long videos")
    ev.add_argument("--seconds", type=float, default=60.0, help="length of the long videos")
    ev.add_argument("--quantize", default="int8", choices=QUANTIZE_MODES)
    ev.add_argument("--seeds", type=int, default=2, help="seeds per prompt (table1)")
    ev.add_argument("--curves", nargs="+", default=["TI2V=runs/dmd2/curve.json", "T2V=runs/dmd2_t2v/curve.json"],
                    help="NAME=curve.json of distillation runs (fig5)")
    ev.add_argument("--out", default="docs", help="folder for table1.md/json and the fig5 plot")
    ev.add_argument("--json", default=None)
    ev.set_defaults(func=_eval)

    # subcommands from other modules
    from magic_demo.retrieval import add_index_cli
    add_index_cli(sub)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
