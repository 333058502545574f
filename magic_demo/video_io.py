"""Streaming mp4 output: frames are encoded window by window, so memory does not grow with video length.

Each window's new frames become one raw H.264 segment (Annex B, no B-frames); after every window the segments
are joined (byte concatenation, stream copy, no re-encode) into a playable mp4 of everything so far, replaced
atomically so a reader never sees a half-written file. Raw segments carry no timestamps, so the mp4's are
regenerated from the frame rate: frame counts are exact (an mp4 concat demuxer left gaps that decoders
filled with duplicated frames).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import imageio_ffmpeg
import numpy as np


class VideoWriteError(RuntimeError):
    """The mp4 could not be written (disk full, unwritable folder, encoder failure)."""


def _ffmpeg() -> str:
    return imageio_ffmpeg.get_ffmpeg_exe()


class SegmentedMp4Writer:
    def __init__(self, path: str | os.PathLike, fps: int, crf: int = 16):
        self.path = Path(path)
        self.fps = int(fps)
        self.crf = crf
        self.frames_written = 0
        self._segments: list[Path] = []
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix=f".{self.path.stem}-segments-", dir=self.path.parent))
        except OSError as exc:
            raise VideoWriteError(f"cannot write video to {self.path.parent}: {exc.strerror or exc}") from exc

    def append(self, frames: np.ndarray) -> None:
        """Encode [T, H, W, 3] uint8 frames as the next segment."""
        frames = np.ascontiguousarray(frames, dtype=np.uint8)
        if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
            raise ValueError(f"frames must be a non-empty [T, H, W, 3] array, got shape {frames.shape}")
        seg = self._dir / f"seg_{len(self._segments):05d}.h264"
        h, w = frames.shape[1:3]
        # One ffmpeg run fed the raw frames at once: imageio's frame-by-frame writer cost 2-3x more per window
        # at 64x64 (measured). x264's own threads only pay off for large frames.
        threads = "1" if w * h <= 256 * 256 else "0"
        cmd = [_ffmpeg(), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}",
               "-r", str(self.fps), "-i", "-", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", str(self.crf),
               "-bf", "0", "-threads", threads, "-f", "h264", str(seg)]
        try:
            done = subprocess.run(cmd, input=frames.tobytes(), capture_output=True)
        except OSError as exc:
            raise VideoWriteError(f"cannot encode video segment {seg.name}: {exc}") from exc
        if done.returncode != 0:
            raise VideoWriteError(f"cannot encode video segment {seg.name}: "
                                  f"{done.stderr.decode(errors='replace').strip()[-300:]}")
        self._segments.append(seg)
        self.frames_written += len(frames)

    def publish(self) -> Path:
        """Join all segments into `path` (atomic replace) and return it."""
        if not self._segments:
            raise VideoWriteError("no frames to publish")
        tmp = self._dir / f"joined{self.path.suffix or '.mp4'}"
        joined = "concat:" + "|".join(str(s) for s in self._segments)
        cmd = [_ffmpeg(), "-y", "-loglevel", "error", "-f", "h264", "-framerate", str(self.fps), "-i", joined,
               "-c", "copy", "-movflags", "+faststart", str(tmp)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise VideoWriteError(f"cannot join video segments: {done.stderr.strip()[-300:]}")
        try:
            os.replace(tmp, self.path)
        except OSError as exc:
            raise VideoWriteError(f"cannot write video to {self.path}: {exc.strerror or exc}") from exc
        return self.path

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "SegmentedMp4Writer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_video(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Decode an mp4 back to ([T, H, W, 3] uint8, fps)."""
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    w, h = meta["size"]
    frames = [np.frombuffer(buf, np.uint8).reshape(h, w, 3) for buf in reader]
    return np.stack(frames) if frames else np.zeros((0, h, w, 3), np.uint8), float(meta["fps"])
