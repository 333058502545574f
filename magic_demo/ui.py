"""The Gradio UI: wiring only. Model work goes through `DemoService`; errors become `gr.Error` messages.

Named API endpoints (gradio_client): `/first_frame` (prompt, seed -> image, provenance), `/retrieve`
(query, k -> gallery, hits), `/generate` (first frame image, prompt, settings -> streamed video, status,
report, seed), `/stop`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import gradio as gr

try:  # Hugging Face ZeroGPU: GPU work runs inside spaces.GPU; elsewhere the package is absent
    import spaces
except ImportError:
    spaces = None

from magic_demo.events import StepFinished, VideoFinished, VideoStarted, WindowFinished, WindowStarted
from magic_demo.first_frame import FirstFrame
from magic_demo.service import DemoService, VideoSettings
from magic_demo.video import FPS_RANGE, MAX_SECONDS

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "examples"


def _save_frame(service: DemoService, frame: FirstFrame) -> str:
    path = service.new_output_path(".png")
    frame.image.save(path)
    return str(path)


def estimate_gpu_seconds(seconds) -> int:
    """ZeroGPU reservation for one request: a start-up margin plus 2 s per second of video."""
    try:
        return int(30 + 2 * min(float(seconds), MAX_SECONDS))
    except (TypeError, ValueError):
        return 30


def _session(request: Optional[gr.Request]) -> str:
    return getattr(request, "session_hash", None) or "api"


def build_app(service: DemoService) -> gr.Blocks:
    preset = service.preset
    quant = "int8" if service.quantize == "int8" else "fp32 weights"

    def first_frame(prompt: str, seed: float):
        try:
            frame = service.generate_first_frame(prompt, None if seed is None or int(seed) < 0 else int(seed))
        except ValueError as exc:
            raise gr.Error(str(exc)) from None
        return _save_frame(service, frame), frame.report()

    def retrieve(query: str, k: float):
        try:
            frames = service.retrieve(query, int(k))
        except ValueError as exc:
            raise gr.Error(str(exc)) from None
        gallery = [(_save_frame(service, f), f"{f.provenance.get('caption') or ''} ({f.provenance.get('score', 0):.3f})")
                   for f in frames]
        return gallery, [f.report() for f in frames]

    def pick(hits: list, evt: gr.SelectData):
        hit = hits[evt.index]
        return evt.value["image"]["path"], hit

    def uploaded(path: Optional[str]):
        if not path:
            return None, {}
        try:
            frame = service.upload(path)
        except ValueError as exc:
            raise gr.Error(str(exc)) from None
        return _save_frame(service, frame), frame.report()

    def generate(image_path: Optional[str], prompt: str, seconds: float, fps: float, steps: float, seed: float,
                 overlap: float, colour_anchor: bool = True, provenance: Optional[dict] = None,
                 request: gr.Request = None,
                 progress=gr.Progress()):
        if not image_path:
            raise gr.Error("Choose a first frame first: generate, retrieve or upload one.")
        try:
            frame = service.chosen_frame(image_path, provenance)
            settings = VideoSettings(seconds=float(seconds), fps=_as_int(fps, "fps"), steps=_as_int(steps, "steps"),
                                     seed=_as_int(seed, "seed"), overlap=_as_int(overlap, "overlap"),
                                     colour_anchor=bool(colour_anchor))
            events = service.run_video(_session(request), frame, prompt or "", settings)
            total_steps, done_steps, video, seed_used = 1, 0, None, settings.seed
            for event in events:
                if isinstance(event, VideoStarted):
                    total_steps, seed_used = event.total_windows * settings.steps, event.seed
                    progress((0, total_steps), desc="starting")
                    yield gr.skip(), f"Starting: {event.total_windows} windows, {event.total_frames} frames", \
                        gr.skip(), seed_used
                elif isinstance(event, (WindowStarted, StepFinished)):
                    done_steps += isinstance(event, StepFinished)
                    step = event.step if isinstance(event, StepFinished) else 0
                    progress((done_steps, total_steps),
                             desc=f"window {event.window} / {event.total_windows} - step {step} / {settings.steps}")
                elif isinstance(event, WindowFinished):
                    video = event.video_path
                    yield video, (f"window {event.window} / {event.total_windows} done - "
                                  f"{event.frames_written} frames so far"), gr.skip(), seed_used
                elif isinstance(event, VideoFinished):
                    r = event.report
                    state = "Stopped" if event.cancelled else "Done"
                    per = f", {r['compute_s_per_video_s']:.2f} s compute per s of video" if r.get(
                        "compute_s_per_video_s") else ""
                    yield event.video_path, (f"{state}: {r['frames']} frames, {r['windows_finished']} / "
                                             f"{r['windows']} windows in {r['wall_s']:.1f} s{per}"), r, seed_used
        except ValueError as exc:
            raise gr.Error(str(exc)) from None
        except OSError as exc:  # e.g. the outputs folder cannot be written
            raise gr.Error(f"could not write the video: {exc}") from None

    if spaces is not None:
        generate = spaces.GPU(duration=lambda image_path, prompt, seconds, *rest, **kw: estimate_gpu_seconds(seconds))(
            generate)

    def example_video(prompt: str, image_path: str):
        frame = service.upload(image_path)
        settings = VideoSettings(seconds=preset.seconds, fps=preset.fps, steps=preset.steps, seed=0)
        *_, done = service.run_video("example", frame, prompt, settings)
        return done.video_path, f"Example: {done.report['frames']} frames, seed 0"

    def stop(request: gr.Request = None):
        return "Stopping after the current step..." if service.stop(_session(request)) else "Nothing is running."

    with gr.Blocks(title="Magic 1-For-1") as demo:
        gr.Markdown("# Magic 1-For-1\nFirst frame + 4-step image-to-video with a sliding window, up to a minute.")
        gr.Markdown(f"Preset **{preset.name}** ({quant}): {preset.description}", elem_id="preset-info")
        prompt = gr.Textbox(label="Prompt", placeholder="a red circle moves left on a black background",
                            elem_id="prompt")
        provenance = gr.State({})
        with gr.Row():
            with gr.Column():
                with gr.Tabs():
                    with gr.Tab("Generate"):
                        t2i_seed = gr.Number(label="Image seed (-1 = random)", value=-1, precision=0)
                        t2i_btn = gr.Button("Generate first frame")
                    with gr.Tab("Retrieve"):
                        query = gr.Textbox(label="Query (follows the prompt; edit to search for something else)")
                        k = gr.Slider(1, 16, value=4, step=1, label="Matches")
                        search_btn = gr.Button("Search gallery")
                        gallery = gr.Gallery(label="Matches (click one to pick it)", columns=4, height=220)
                        hits = gr.JSON(value=[], label="Match details", visible=False)
                    with gr.Tab("Upload"):
                        upload = gr.File(label="Upload an image (PNG, JPEG or WebP)", file_types=["image"],
                                         type="filepath", elem_id="upload")
                image = gr.Image(label="First frame", type="filepath", interactive=False, elem_id="first-frame",
                                 height=256)
                # What /generate reads: a plain file, so a bad upload through the API reaches our own checks
                # (and their specific messages) instead of failing in the image component's decoder.
                frame_file = gr.File(visible=False)
                info = gr.JSON(label="First frame source", value={})
            with gr.Column():
                with gr.Accordion("Settings", open=False):
                    seconds = gr.Slider(0.5, MAX_SECONDS, value=preset.seconds, step=0.5, label="Seconds")
                    fps = gr.Slider(FPS_RANGE[0], 30, value=preset.fps, step=1, label="FPS")
                    gr.Dropdown([f"{w}x{h}" for w, h in preset.buckets], value=f"{preset.width}x{preset.height}",
                                label="Resolution bucket (the first frame is fitted to the nearest)",
                                interactive=False)
                    steps = gr.Slider(1, 50, value=preset.steps, step=1, label="Steps")
                    seed = gr.Number(label="Seed (-1 = random)", value=-1, precision=0, elem_id="seed")
                    overlap = gr.Slider(0, preset.window_frames - 2, value=0, step=1, label="Window overlap (frames)")
                    colour_anchor = gr.Checkbox(value=True, label="Colour anchor: match every frame's colours to "
                                                "the first frame's (no hue drift, also over a minute)")
                with gr.Row():
                    gen_btn = gr.Button("Generate video", variant="primary", elem_id="generate")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
                status = gr.Markdown("", elem_id="status")
                video = gr.Video(label="Video", elem_id="video", autoplay=True)
                report = gr.JSON(label="Report")
        examples = [[json.loads(p.with_suffix(".json").read_text())["prompt"], str(p)]
                    for p in sorted(EXAMPLES_DIR.glob("*.png")) if p.with_suffix(".json").is_file()]
        if examples:
            # Lazily cached: the first click on an example generates its video, later clicks replay it.
            gr.Examples(examples, inputs=[prompt, image], outputs=[video, status], fn=example_video,
                        cache_examples=True, cache_mode="lazy", label="Examples")

        t2i_btn.click(first_frame, [prompt, t2i_seed], [image, info], api_name="first_frame",
                      concurrency_id="model")
        prompt.change(lambda p: p, [prompt], [query], api_name=False)  # the query defaults to the prompt
        search_btn.click(retrieve, [query, k], [gallery, hits],
                         api_name="retrieve")
        gallery.select(pick, [hits], [image, info], api_name=False)
        upload.upload(uploaded, [upload], [image, info], api_name=False)
        image.change(lambda p: p, [image], [frame_file], api_name=False)
        info.change(lambda d: d, [info], [provenance], api_name=False)
        gen_btn.click(generate, [frame_file, prompt, seconds, fps, steps, seed, overlap, colour_anchor, provenance],
                      [video, status, report, seed], api_name="generate", concurrency_id="model")
        stop_btn.click(stop, None, [status], api_name="stop", concurrency_limit=None)
    return demo


def _as_int(value, name: str) -> int:
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if as_float != as_float or as_float in (float("inf"), float("-inf")) or as_float != int(as_float):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(as_float)


def launch_local(service: DemoService, queue_size: int = 4) -> tuple[gr.Blocks, str]:
    """Build the app and serve it on a free loopback port without blocking (browser tests, benchmarks).
    Serves the service's outputs and `assets/`; returns (the running Blocks, its URL); `close()` it when done."""
    import socket

    from magic_demo.presets import ASSETS

    demo = build_app(service).queue(max_size=queue_size, default_concurrency_limit=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                allowed_paths=[str(service.outputs_dir), str(ASSETS)])
    return demo, f"http://127.0.0.1:{port}/"
