"""The video engine: one prompt encoding per video, then the sliding window, streaming mp4, typed events.

`generate_video` is synchronous and reports through a callback; `stream_video` runs it on a worker thread and
yields the same events (what a Gradio generator consumes). A CancelToken stops it within one sampler step;
the windows finished before the cancel are kept and written.
"""

from __future__ import annotations

import math
import os
import queue
import random
import resource
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from PIL import Image

from magic_demo.events import (CancelToken, Event, StepFinished, VideoFinished, VideoStarted, WindowFinished,
                               WindowStarted)
from magic_demo.pipeline import MagicI2VPipeline, neutral_image
from magic_demo.sampling import MAX_STEPS, Cancelled
from magic_demo.video_io import SegmentedMp4Writer
from magic_demo.windows import FrameAssembler, derive_window_seed, plan_windows

MAX_SECONDS = 60.0
FPS_RANGE = (1, 60)
MAX_SEED = 2**63 - 1
MAX_PROMPT_CHARS = 2000  # far beyond what the text encoders read (256 tokens); longer text is refused
CONDITION_MODES = ("last_frame", "last_latent")


@dataclass
class VideoRequest:
    image: Image.Image
    prompt: str
    seconds: float = 4.0
    fps: int = 8
    steps: int = 4
    seed: int = -1  # -1: random; the seed used is in the report
    window_frames: int = 33
    overlap: int = 0
    condition: str = "last_frame"
    colour_anchor: bool = True  # histogram-match every decoded frame to the first frame (windows.py)
    denoise_threads: Optional[int] = None  # CPU threads for windows 2+ (None: half the cores, see generate_video)
    guidance_scale: float = 1.0  # input of a CFG-distilled transformer (if it has a guidance embedding)
    true_cfg_scale: float = 1.0  # > 1: classic two-pass CFG (explicit opt-in)
    image_guidance_scale: float = 1.0  # != 1: one more pass per step, guided toward the first frame (pipeline.denoise)
    negative_prompt: str = ""
    height: Optional[int] = None  # default: the image's own size
    width: Optional[int] = None
    max_seconds: float = MAX_SECONDS
    extra_report: dict = field(default_factory=dict)  # e.g. preset, first-frame provenance

    @property
    def total_frames(self) -> int:
        return int(round(self.seconds * self.fps))

    def validate(self) -> None:
        """Raise ValueError naming the first bad parameter and its value."""
        check_prompt(self.prompt, "prompt", allow_empty=True)
        if not _is_number(self.seconds) or not 0 < self.seconds <= self.max_seconds:
            raise ValueError(f"seconds must be in (0, {self.max_seconds:g}], got {self.seconds!r}")
        if not _is_int(self.fps) or not FPS_RANGE[0] <= self.fps <= FPS_RANGE[1]:
            raise ValueError(f"fps must be an integer in [{FPS_RANGE[0]}, {FPS_RANGE[1]}], got {self.fps!r}")
        if self.total_frames < 1:
            raise ValueError(f"seconds * fps must give at least one frame, got {self.seconds!r} * {self.fps!r}")
        if not _is_int(self.steps) or not 1 <= self.steps <= MAX_STEPS:
            raise ValueError(f"steps must be an integer in [1, {MAX_STEPS}], got {self.steps!r}")
        if not _is_int(self.seed) or not -1 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be -1 (random) or an integer in [0, 2**63-1], got {self.seed!r}")
        if self.condition not in CONDITION_MODES:
            raise ValueError(f"condition must be one of {CONDITION_MODES}, got {self.condition!r}")
        if self.condition == "last_latent" and self.overlap:
            raise ValueError(f"overlap must be 0 with condition='last_latent', got {self.overlap!r}")
        if not _is_int(self.overlap) or not 0 <= self.overlap <= self.window_frames - 2:
            raise ValueError(f"overlap must be an integer in [0, window_frames - 2 = {self.window_frames - 2}], "
                             f"got {self.overlap!r}")
        if self.denoise_threads is not None and (not _is_int(self.denoise_threads) or self.denoise_threads < 1):
            raise ValueError(f"denoise_threads must be None or a positive integer, got {self.denoise_threads!r}")
        if not isinstance(self.colour_anchor, bool):
            raise ValueError(f"colour_anchor must be True or False, got {self.colour_anchor!r}")
        for name in ("guidance_scale", "true_cfg_scale", "image_guidance_scale"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 <= value <= 30:
                raise ValueError(f"{name} must be a number in [0, 30], got {value!r}")


def check_prompt(text, name: str = "prompt", allow_empty: bool = False) -> str:
    """Refuse non-strings, over-long text and (unless allowed) empty text, naming the parameter."""
    if not isinstance(text, str):
        raise ValueError(f"{name} must be a string, got {type(text).__name__}")
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(f"{name} is too long: {len(text)} characters, at most {MAX_PROMPT_CHARS}")
    if not allow_empty and not text.strip():
        raise ValueError(f"{name} is empty: describe what the first frame should show")
    return text


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.number)) and not isinstance(x, bool) and math.isfinite(x)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@contextmanager
def _intra_op_threads(n: Optional[int]):
    """torch's CPU thread count set to `n` for a block (None: unchanged), restored afterwards."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _prepare_image(pipe: MagicI2VPipeline, req: VideoRequest) -> Image.Image:
    image = req.image
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL.Image, got {type(image).__name__}")
    width, height = req.width or image.size[0], req.height or image.size[1]
    pipe.check_inputs(image, height, width, 1, req.steps)
    return image if image.size == (width, height) else image.resize((width, height), Image.LANCZOS)


def generate_video(pipe: MagicI2VPipeline, req: VideoRequest, out_path: str | Path,
                   on_event: Optional[Callable[[Event], None]] = None,
                   cancel: Optional[CancelToken] = None) -> VideoFinished:
    """Make the whole video; returns (and emits) the final VideoFinished event."""
    emit = on_event or (lambda event: None)
    cancel = cancel or CancelToken()
    req.validate()
    image = _prepare_image(pipe, req)
    geom = pipe.geometry
    if not geom.valid_num_frames(req.window_frames):
        raise ValueError(f"window_frames must be {geom.temporal_ratio}k+1, got {req.window_frames!r}")
    seed = random.randrange(0, 2**31) if req.seed == -1 else int(req.seed)
    plans = plan_windows(req.total_frames, req.window_frames, req.overlap, geom.temporal_ratio)
    calls_before = pipe.calls.copy()
    t0 = time.perf_counter()
    emit(VideoStarted(len(plans), req.total_frames, req.fps, seed))

    # Prompt + reference-image tokens: once per video, reused by every window.
    use_cfg = req.true_cfg_scale > 1.0
    embeds = pipe.encode_prompt(req.prompt, image, req.negative_prompt if use_cfg else None)
    prompt, negative = embeds.select(0), (embeds.select(1) if use_cfg else None)
    # Image guidance's image-free pass: the same prompt, the VLM shown no picture (the video's first frame, like
    # every window's latent conditioning frame, is what it guides toward).
    imageless = (pipe.encode_prompt(req.prompt, neutral_image(image.size)).select(0)
                 if req.image_guidance_scale != 1.0 else None)

    assembler = FrameAssembler(req.total_frames, req.overlap)
    per_window_s: list[float] = []
    first_window_at: list[float] = []  # seconds from start to the first playable mp4
    cancelled = False
    cond_image, cond_latent = image, None
    reference = np.asarray(image) if req.colour_anchor else None  # the colour anchor's: the video's first frame
    # On CPU with a per-frame VAE (the miniature), the writer thread decodes each window while the main thread
    # denoises the next one; only the frame that conditions the next window is decoded up front. torch's CPU
    # thread count is process-wide, so from window 2 on it is set once for both sides (half the cores each):
    # the transformer's many small ops stall whenever another busy thread pre-empts one of their OpenMP threads.
    # The first window, with nothing beside it, denoises on every thread. Measured on 2 cores: see the README's
    # performance section. Other VAEs (temporally compressing) decode on the main thread on every thread.
    on_cpu = pipe.transformer.device.type == "cpu"
    overlap_decode = on_cpu and geom.temporal_ratio == 1
    cores = torch.get_num_threads()
    side_threads = (req.denoise_threads or max(1, cores // 2)) if on_cpu else None

    def decode_window(latents: torch.Tensor, plan, start_image: Image.Image) -> np.ndarray:
        if plan.index > 0 and geom.temporal_ratio == 1:
            # A per-frame VAE need not decode frame 0: it is the conditioning frame, already in the video.
            return np.concatenate([np.asarray(start_image)[None], pipe.decode(latents[:, :, 1:], reference).numpy()])
        return pipe.decode(latents, reference).numpy()

    def publish(writer: SegmentedMp4Writer, plan, frames: Optional[np.ndarray], latents: torch.Tensor,
                start_image: Image.Image, tw: float, last: bool) -> Path:
        """Writer thread: decode the window (unless done already), encode its final frames, re-mux, announce."""
        if frames is None:
            frames = decode_window(latents, plan, start_image)
        final = assembler.add(plan, frames, last)
        if len(final):
            writer.append(final)
        path = writer.publish()
        per_window_s.append(time.perf_counter() - tw)
        if not first_window_at:
            first_window_at.append(time.perf_counter() - t0)
        emit(WindowFinished(plan.index + 1, len(plans), writer.frames_written, str(path), per_window_s[-1]))
        return path

    # Encoding + re-muxing the mp4 runs on one writer thread while the next window denoises; windows are
    # written in order. A write error stops the video at the next window.
    with SegmentedMp4Writer(out_path, req.fps) as writer, ThreadPoolExecutor(1, "magic-mp4") as io, \
            _intra_op_threads(side_threads):
        written: list[Future] = []
        for plan in plans:
            _raise_write_error(written)
            if cancel.cancelled:
                cancelled = True
                break
            tw = time.perf_counter()
            k, n = plan.index + 1, len(plans)
            emit(WindowStarted(k, n, plan.num_frames))
            # cond_image is a decoded frame, already colour-matched when the anchor is on
            latent = cond_latent if cond_latent is not None else pipe.encode_image(cond_image)
            condition = pipe.prepare_condition(latent, geom.latent_frames(plan.num_frames))
            generator = torch.Generator().manual_seed(derive_window_seed(seed, plan.index))
            try:
                with _intra_op_threads(cores if on_cpu and plan.index == 0 else None):
                    latents = pipe.denoise(
                        condition, prompt, req.steps, generator, req.guidance_scale, req.true_cfg_scale, negative,
                        callback=lambda i, _x, k=k: emit(StepFinished(k, n, i + 1, req.steps)),
                        should_stop=lambda: cancel.cancelled, image_guidance_scale=req.image_guidance_scale,
                        imageless=imageless)
            except Cancelled:
                cancelled = True
                break
            last = plan is plans[-1]
            nxt = None if last else plans[plan.index + 1]
            frames = None
            if not overlap_decode:
                with _intra_op_threads(cores if on_cpu else None):
                    frames = decode_window(latents, plan, cond_image)
            written.append(io.submit(publish, writer, plan, frames, latents, cond_image, tw, last))
            # Condition the next window on the frame it starts on (see windows.py).
            if nxt is not None:
                i = nxt.start - plan.start
                if frames is not None:
                    cond_image = Image.fromarray(frames[i])
                else:
                    cond_image = Image.fromarray(pipe.decode(latents[:, :, i:i + 1], reference).numpy()[0])
                cond_latent = latents[:, :, -1:] if req.condition == "last_latent" else None
        video_path = written[-1].result() if written else None  # waits for every write, raises the first error
        _raise_write_error(written)
        if cancelled:
            rest = assembler.flush()
            if len(rest):
                writer.append(rest)
                video_path = writer.publish()
    first_window_at = first_window_at[0] if first_window_at else None

    wall = time.perf_counter() - t0
    calls = pipe.calls - calls_before
    frames_out = assembler.emitted if video_path else 0
    report = dict(
        preset=req.extra_report.get("preset", ""), frames=frames_out, requested_frames=req.total_frames,
        fps=req.fps, seconds=frames_out / req.fps, requested_seconds=req.seconds, windows=len(plans),
        windows_finished=len(per_window_s), window_frames=req.window_frames, overlap=req.overlap,
        condition=req.condition, colour_anchor=req.colour_anchor, denoise_threads=side_threads, steps=req.steps, height=image.size[1], width=image.size[0],
        transformer_calls=calls["transformer"], text_encoder_calls=calls["text_encoder"],
        text_encoder_2_calls=calls["text_encoder_2"], vae_encode_calls=calls["vae_encode"],
        vae_decode_calls=calls["vae_decode"], wall_s=round(wall, 4), per_window_s=[round(s, 4) for s in per_window_s],
        time_to_first_window_s=round(first_window_at, 4) if first_window_at is not None else None,
        compute_s_per_video_s=round(wall / (frames_out / req.fps), 4) if frames_out else None,
        peak_rss_mb=round(peak_rss_mb(), 1), quantized=_is_quantized(pipe.transformer), seed=seed,
        guidance_scale=req.guidance_scale, true_cfg_scale=req.true_cfg_scale,
        image_guidance_scale=req.image_guidance_scale, cancelled=cancelled,
        video_path=str(video_path) if video_path else None,
    )
    report.update({k: v for k, v in req.extra_report.items() if k != "preset"})
    done = VideoFinished(str(video_path) if video_path else None, report, cancelled)
    emit(done)
    return done


def _raise_write_error(written: list[Future]) -> None:
    for future in written:
        if future.done() and future.exception() is not None:
            raise future.exception()


def _is_quantized(module: torch.nn.Module) -> bool:
    from magic_demo.quantize import is_quantized

    return is_quantized(module)


_END = object()


def stream_video(pipe: MagicI2VPipeline, req: VideoRequest, out_path: str | Path,
                 cancel: Optional[CancelToken] = None) -> Iterator[Event]:
    """Run `generate_video` on a worker thread and yield its events as they happen.

    A WindowFinished's `video_path` is a snapshot of the video up to that window, removed when the next event is
    requested (the final video, in VideoFinished, stays).

    Errors raised by the engine are re-raised here. If the consumer stops iterating (a client went away),
    the job is cancelled and the worker joined, so nothing keeps running in the background.
    """
    cancel = cancel or CancelToken()
    events: queue.Queue = queue.Queue()
    failure: list[BaseException] = []

    def work():
        try:
            generate_video(pipe, req, out_path, lambda e: events.put(_snapshot(e)), cancel)
        except BaseException as exc:  # handed to the consumer thread, re-raised there
            failure.append(exc)
        finally:
            events.put(_END)

    worker = threading.Thread(target=work, name="magic-video", daemon=True)
    worker.start()
    event = None
    try:
        while (event := events.get()) is not _END:
            yield event
            _drop_snapshot(event)  # the consumer asked for the next event: it is done with this one
        if failure:
            raise failure[0]
    finally:
        if worker.is_alive():
            cancel.cancel()
        worker.join()
        _drop_snapshot(event)  # the consumer left early: this snapshot and any still queued go
        while not events.empty():
            _drop_snapshot(events.get())


def _snapshot(event: Event) -> Event:
    """Give a WindowFinished its own file. The writer re-muxes the next window into the same path while the
    consumer (a Gradio generator) may still be about to copy this one; a hard link keeps this window's file
    until the consumer has moved on."""
    if not isinstance(event, WindowFinished):
        return event
    path = Path(event.video_path)
    snap = path.with_name(f"{path.stem}.window-{event.window:03d}{path.suffix}")
    try:
        snap.unlink(missing_ok=True)
        os.link(path, snap)
    except OSError:  # no hard links here: a copy does the same
        shutil.copyfile(path, snap)
    return replace(event, video_path=str(snap))


def _drop_snapshot(event) -> None:
    if isinstance(event, WindowFinished):
        Path(event.video_path).unlink(missing_ok=True)
