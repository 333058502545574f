"""Streaming mp4 output: frames are encoded window by window, so memory does not grow with video length.

One in-process H.264 encoder (PyAV's libx264, no B-frames, no lookahead) lives for the whole video, so every
frame it is given comes back as a packet at once. Packets are spooled to a file beside the video; after every
window they are muxed (stream copy, no re-encode) into a playable mp4 of everything so far, replaced atomically
so a reader never sees a half-written file. Timestamps are the frame indices, so frame counts are exact.
(Two ffmpeg processes per window cost ~40 ms of CPU at 64x64; this costs ~10, measured.)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from fractions import Fraction
from pathlib import Path

import av
import imageio_ffmpeg
import numpy as np


class VideoWriteError(RuntimeError):
    """The mp4 could not be written (disk full, unwritable folder, encoder failure)."""


class SegmentedMp4Writer:
    def __init__(self, path: str | os.PathLike, fps: int, crf: int = 16):
        self.path = Path(path)
        self.fps = int(fps)
        self.crf = crf
        self.frames_written = 0
        self._encoder: av.CodecContext | None = None
        self._index: list[tuple[int, int, bool]] = []  # (size, pts, keyframe) of each spooled packet
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix=f".{self.path.stem}-segments-", dir=self.path.parent))
            self._spool = open(self._dir / "packets.h264", "w+b")
        except OSError as exc:
            raise VideoWriteError(f"cannot write video to {self.path.parent}: {exc.strerror or exc}") from exc

    def _open_encoder(self, h: int, w: int) -> av.CodecContext:
        enc = av.CodecContext.create("libx264", "w")
        enc.width, enc.height, enc.pix_fmt = w, h, "yuv420p"
        enc.time_base, enc.framerate = Fraction(1, self.fps), Fraction(self.fps)
        # zerolatency: no lookahead and no B-frames, so each frame's packet is out before the next window.
        # x264's own threads only pay off for large frames.
        enc.options = {"crf": str(self.crf), "tune": "zerolatency",
                       "threads": "1" if w * h <= 256 * 256 else "0"}
        enc.open()
        return enc

    def append(self, frames: np.ndarray) -> None:
        """Encode [T, H, W, 3] uint8 frames as the next segment."""
        frames = np.ascontiguousarray(frames, dtype=np.uint8)
        if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
            raise ValueError(f"frames must be a non-empty [T, H, W, 3] array, got shape {frames.shape}")
        h, w = frames.shape[1:3]
        if self._encoder is None:
            self._encoder = self._open_encoder(h, w)
        elif (h, w) != (self._encoder.height, self._encoder.width):
            raise ValueError(f"frames must stay {self._encoder.height}x{self._encoder.width}, got {h}x{w}")
        try:
            for frame in frames:
                picture = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="yuv420p")
                picture.pts = self.frames_written
                self.frames_written += 1
                for packet in self._encoder.encode(picture):
                    data = bytes(packet)
                    self._index.append((len(data), packet.pts, packet.is_keyframe))
                    self._spool.write(data)
            self._spool.flush()
        except (av.FFmpegError, OSError) as exc:
            raise VideoWriteError(f"cannot encode video segment {len(self._index)}: {exc}") from exc

    def publish(self) -> Path:
        """Mux every packet so far into `path` (atomic replace) and return it."""
        if not self._index:
            raise VideoWriteError("no frames to publish")
        enc = self._encoder
        tmp = self._dir / f"joined{self.path.suffix or '.mp4'}"
        try:
            with av.open(str(tmp), "w", format="mp4", options={"movflags": "+faststart"}) as out:
                stream = out.add_stream("h264", rate=self.fps)
                stream.width, stream.height, stream.pix_fmt = enc.width, enc.height, "yuv420p"
                stream.codec_context.extradata = enc.extradata
                stream.time_base = enc.time_base
                self._spool.seek(0)
                for size, pts, key in self._index:
                    packet = av.Packet(self._spool.read(size))
                    packet.pts = packet.dts = pts
                    packet.time_base, packet.stream, packet.is_keyframe = enc.time_base, stream, key
                    out.mux(packet)
            self._spool.seek(0, os.SEEK_END)
            os.replace(tmp, self.path)
        except (av.FFmpegError, OSError) as exc:
            raise VideoWriteError(f"cannot write video to {self.path}: {getattr(exc, 'strerror', None) or exc}") \
                from exc
        return self.path

    def close(self) -> None:
        self._spool.close()
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
