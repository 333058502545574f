"""The demo's model work behind the UI: first frames from three sources and streamed video jobs.

No Gradio here (the UI module translates). Models load lazily on first use or in `warm_up()`, never at
import time. One `DemoService` per preset; jobs are keyed by an id (the UI uses the browser session) so a
Stop request reaches the running job's cancel token.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from PIL import Image

from magic_demo.events import CancelToken, Event
from magic_demo.first_frame import DEFAULT_MIN_SIDE, FirstFrame, load_upload
from magic_demo.presets import Preset, get_preset, load_pipeline
from magic_demo.video import VideoRequest, check_prompt, stream_video


@dataclass
class VideoSettings:
    seconds: float
    fps: int
    steps: int = 4
    seed: int = -1
    overlap: int = 0
    colour_anchor: bool = True


class DemoService:
    def __init__(self, preset: str | Preset, quantize: str = "int8", outputs_dir: str | Path = "outputs",
                 keep_outputs: int = 200, compile: bool = False):
        self.preset = get_preset(preset) if isinstance(preset, str) else preset
        self.quantize = quantize
        self.compile = compile
        self.outputs_dir = Path(outputs_dir).resolve()
        self.keep_outputs = keep_outputs
        self._lock = threading.Lock()
        self._pipe = self._t2i = self._index = None
        self._jobs: dict[str, CancelToken] = {}

    # ---- lazily loaded models -----------------------------------------------------------------------
    @property
    def pipe(self):
        with self._lock:
            if self._pipe is None:
                self._pipe = load_pipeline(self.preset, quantize=self.quantize, compile=self.compile)
            return self._pipe

    @property
    def text_to_image(self):
        with self._lock:
            if self._t2i is None:
                if self.preset.text_to_image is None:
                    raise ValueError(f"preset {self.preset.name!r} has no text-to-image model")
                self._t2i = self.preset.text_to_image()
            return self._t2i

    @property
    def index(self):
        from magic_demo.retrieval import RetrievalIndex

        with self._lock:
            if self._index is None:
                if self.preset.gallery_index is None:
                    raise ValueError(f"preset {self.preset.name!r} has no retrieval gallery")
                self._index = RetrievalIndex.load(self.preset.gallery_index)
            return self._index

    def warm_up(self) -> None:
        self.pipe, self.text_to_image, self.index  # noqa: B018 (load everything before serving)

    # ---- first frames -------------------------------------------------------------------------------
    def generate_first_frame(self, prompt: str, seed: Optional[int] = None) -> FirstFrame:
        check_prompt(prompt, "prompt")
        bucket = self.preset.buckets[0]
        return self.text_to_image.generate(prompt, seed, bucket)

    def retrieve(self, query: str, k: int = 4) -> list[FirstFrame]:
        check_prompt(query, "query")
        if not 1 <= int(k) <= 32:
            raise ValueError(f"k must be between 1 and 32, got {k!r}")
        index = self.index
        return [index.hit_to_first_frame(hit, self.preset.buckets, query=query) for hit in index.search_text(query, k)]

    def upload(self, source) -> FirstFrame:
        # Presets smaller than the usual minimum (tiny test models) accept their own size.
        smallest = min(min(b) for b in self.preset.buckets)
        return load_upload(source, self.preset.buckets, min_side=min(DEFAULT_MIN_SIDE, smallest))

    def chosen_frame(self, path: str | os.PathLike, provenance: Optional[dict] = None) -> FirstFrame:
        """The first frame the UI already chose (a file it wrote), checked again and re-fitted, keeping where it
        came from (generated / retrieved) when the UI says so."""
        frame = self.upload(path)
        if provenance and provenance.get("source") in FirstFrame.SOURCES:
            return FirstFrame(frame.image, provenance["source"],
                              {k: v for k, v in provenance.items() if k not in ("source", "size")})
        return frame

    # ---- video jobs ---------------------------------------------------------------------------------
    def new_output_path(self, suffix: str = ".mp4") -> Path:
        self.outputs_dir.mkdir(parents=True, exist_ok=True)
        self._clean_outputs()
        return self.outputs_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}{suffix}"

    def _clean_outputs(self) -> None:
        """Keep the newest `keep_outputs` files; older ones go (the folder stays bounded)."""
        files = sorted((p for p in self.outputs_dir.iterdir() if p.is_file()), key=lambda p: p.stat().st_mtime)
        for old in files[: max(0, len(files) - self.keep_outputs)]:
            old.unlink(missing_ok=True)

    def make_request(self, first_frame: FirstFrame, prompt: str, settings: VideoSettings) -> VideoRequest:
        p = self.preset
        width, height = first_frame.image.size
        req = VideoRequest(image=first_frame.image, prompt=prompt or "", seconds=settings.seconds, fps=settings.fps,
                           steps=settings.steps, seed=settings.seed, window_frames=p.window_frames,
                           overlap=settings.overlap, colour_anchor=settings.colour_anchor,
                           guidance_scale=p.guidance_scale,
                           true_cfg_scale=p.true_cfg_scale, image_guidance_scale=p.image_guidance_scale,
                           width=width, height=height,
                           extra_report={"preset": p.name, "first_frame": first_frame.report(),
                                         "quantize": self.quantize})
        req.validate()
        return req

    def run_video(self, job_id: str, first_frame: FirstFrame, prompt: str, settings: VideoSettings) -> Iterator[Event]:
        """Validate, then stream the job's events. `stop(job_id)` cancels it within one sampler step."""
        req = self.make_request(first_frame, prompt, settings)
        pipe = self.pipe
        token = CancelToken()
        self._jobs[job_id] = token
        try:
            yield from stream_video(pipe, req, self.new_output_path(), token)
        finally:
            if self._jobs.get(job_id) is token:
                del self._jobs[job_id]

    def stop(self, job_id: str) -> bool:
        token = self._jobs.get(job_id)
        if token is None:
            return False
        token.cancel()
        return True

    @property
    def running_jobs(self) -> int:
        return len(self._jobs)

