"""Typed events streamed by the video engine; the CLI, the UI and the benchmarks consume the same stream."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Optional, Union


class CancelToken:
    """Cooperative cancel flag: set by the UI/CLI, checked by the sampler before every step."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


@dataclass(frozen=True)
class VideoStarted:
    total_windows: int
    total_frames: int
    fps: int
    seed: int


@dataclass(frozen=True)
class WindowStarted:
    window: int  # 1-based
    total_windows: int
    num_frames: int


@dataclass(frozen=True)
class StepFinished:
    window: int  # 1-based
    total_windows: int
    step: int  # 1-based
    total_steps: int


@dataclass(frozen=True)
class WindowFinished:
    window: int  # 1-based
    total_windows: int
    frames_written: int  # frames in the playable video so far
    video_path: str  # playable mp4 of everything so far (from stream_video: a snapshot, gone at the next event)
    window_s: float


@dataclass(frozen=True)
class VideoFinished:
    video_path: Optional[str]  # None when cancelled before any window finished
    report: dict = field(default_factory=dict)
    cancelled: bool = False


Event = Union[VideoStarted, WindowStarted, StepFinished, WindowFinished, VideoFinished]
