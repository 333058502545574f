"""Test-time sliding window: how a long video is cut into clips the I2V model can make.

Timeline (frames), window size F = 9, overlap O = 2, the paper gives no detail so this is our design:

    window 1  [0 1 2 3 4 5 6 7 8]
    window 2               [6 7 8 9 ...]     conditioned on frame 6 = 8 - O of window 1
                            ^ ^ ^
                            | +-+-- frames 7, 8 cross-faded (old -> new)
                            +------ conditioning frame, kept from window 1

Window k+1 starts on frame `end_k - 1 - O` of window k, whose pixels condition it (re-encoded by the VAE,
or with `condition="last_latent"` and O = 0, the last latent frame reused). Each window adds F - 1 - O new
frames; the last window is shortened to the smallest valid length, and the output is trimmed to exactly
`total_frames`.

Colour anchor: every window copies the colours of a frame the model made, so small hue errors compound over
a minute (purple -> blue -> red -> ... in our measurements), and the miniature VAE itself shifts some hues
(purple -> blue, yellow -> orange). With the anchor on, every decoded frame's colours are mapped onto the video's
first frame's (`match_colours`, the "colour match" of long image-to-image animation tools: a linear colour transfer,
then per-channel histogram matching), so the frame that conditions the next window is too. Layout and motion stay
the model's; only the palette is mapped back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class WindowPlan:
    index: int  # 0-based
    start: int  # timeline index of the window's frame 0
    num_frames: int  # valid clip length (temporal_ratio * k + 1)

    @property
    def end(self) -> int:
        return self.start + self.num_frames


def fit_frames(needed: int, temporal_ratio: int) -> int:
    """Smallest valid clip length (temporal_ratio*k + 1) holding `needed` frames."""
    return 1 + temporal_ratio * math.ceil(max(needed - 1, 0) / temporal_ratio)


def plan_windows(total_frames: int, window_frames: int, overlap: int = 0, temporal_ratio: int = 4) -> list[WindowPlan]:
    if total_frames < 1:
        raise ValueError(f"total_frames must be >= 1, got {total_frames!r}")
    if window_frames < 2 or (window_frames - 1) % temporal_ratio:
        raise ValueError(f"window_frames must be {temporal_ratio}k+1 and >= 2, got {window_frames!r}")
    if not 0 <= overlap <= window_frames - 2:
        raise ValueError(f"overlap must be between 0 and window_frames - 2 = {window_frames - 2}, got {overlap!r}")
    plans = [WindowPlan(0, 0, min(window_frames, fit_frames(total_frames, temporal_ratio)))]
    while plans[-1].end < total_frames:
        start = plans[-1].end - 1 - overlap
        plans.append(WindowPlan(len(plans), start, min(window_frames, fit_frames(total_frames - start, temporal_ratio))))
    return plans


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix."""
    w, v = np.linalg.eigh(matrix)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def transfer_colour_moments(frame: np.ndarray, reference: np.ndarray, eps: float = 25.0) -> np.ndarray:
    """Linear colour transfer: the affine map of RGB that takes `frame`'s colour mean and covariance to
    `reference`'s and moves colours least (the Monge-Kantorovich solution between two Gaussians), applied to
    `frame` (uint8 [H, W, 3]). It works on whole colours, so it undoes a hue shift that reverses a channel's order:
    an orange shape on dark green drifted to red has gone from above the background's green to below it, and
    per-channel matching alone would then give the shape the background's green. `eps` (a variance, in uint8
    units squared) is added to both covariances so the near-flat directions of a plain frame are not amplified."""
    x = np.asarray(frame).reshape(-1, 3)
    r = np.asarray(reference).reshape(-1, 3)

    def moments(pixels):  # from every k-th pixel (65,536 to 131,071 of them in a large frame): cheaper
        sample = pixels[:: max(1, len(pixels) >> 16)].astype(np.float64)
        return sample.mean(0), np.cov(sample, rowvar=False) + eps * np.eye(3)

    (mean_x, cov_x), (mean_r, cov_r) = moments(x), moments(r)
    root_x = _sqrtm(cov_x)
    inv_root_x = np.linalg.inv(root_x)
    linear = (inv_root_x @ _sqrtm(root_x @ cov_r @ root_x) @ inv_root_x).astype(np.float32)
    offset = (mean_r - linear.astype(np.float64) @ mean_x).astype(np.float32)
    x = x.astype(np.float32)
    # channel by channel: numpy's matmul of a tall [N, 3] array by a 3x3 is ~7x slower than these sums
    out = np.stack([x[:, 0] * row[0] + x[:, 1] * row[1] + x[:, 2] * row[2] + o for row, o in zip(linear, offset)], 1)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(np.shape(frame))


def match_colours(frame: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """`frame`'s colours mapped onto `reference`'s (both uint8 [H, W, 3]; sizes may differ): the linear colour
    transfer (`transfer_colour_moments`) puts every colour on the right side of the others, then per-channel
    histogram matching makes each channel's distribution follow the reference's. Measured on the miniature's
    one-minute videos (colour kept, 8 videos): 89.6% with histogram matching alone, 99.9% with both.
    Equal input values stay equal (value-level CDFs,
    not pixel ranks), so flat areas stay flat. Each value goes to the reference value at its quantile (the
    reference's inverse CDF), never to a blend of two: where the reference jumps from a flat background to a flat
    shape, interpolating would invent in-between values for the shape's darker pixels (measured on the miniature's
    one-minute videos: colour kept 58% with interpolation, 64% without, 20 videos). A 256-entry lookup table per
    channel: cheap enough to run on every output frame."""
    frame, reference = transfer_colour_moments(frame, reference), np.asarray(reference, np.uint8)
    out = np.empty_like(frame)
    for c in range(frame.shape[-1]):
        cdf = np.cumsum(np.bincount(frame[..., c].ravel(), minlength=256)) / frame[..., c].size
        ref_cdf = np.cumsum(np.bincount(reference[..., c].ravel(), minlength=256)) / reference[..., c].size
        # the first reference value whose CDF reaches the quantile (the tolerance absorbs float rounding); the
        # CDF only rises at values the reference has, so only those are chosen
        table = np.minimum(np.searchsorted(ref_cdf, cdf - 1e-9), 255).astype(np.uint8)
        out[..., c] = table[frame[..., c]]
    return out


def derive_window_seed(seed: int, window: int) -> int:
    """Independent, reproducible per-window seed from the user's seed."""
    return int(np.random.SeedSequence([int(seed), int(window)]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class FrameAssembler:
    """Turns overlapping window clips into the final frame sequence, holding back only the frames that the next
    window will cross-fade (at most `overlap`), so memory stays flat."""

    def __init__(self, total_frames: int, overlap: int):
        self.total_frames = total_frames
        self.overlap = overlap
        self.emitted = 0  # timeline frames already handed out
        self._pending: Optional[np.ndarray] = None  # frames [emitted, emitted + len) awaiting the cross-fade

    def add(self, plan: WindowPlan, frames: np.ndarray, last: bool) -> np.ndarray:
        """Add window `plan`'s frames [F, H, W, 3]; return the frames now final (may be empty)."""
        frames = frames[: max(0, self.total_frames - plan.start)]
        skip = self.emitted - plan.start  # frames of this window already emitted (the conditioning frame)
        new = frames[skip:]
        if self._pending is not None and len(self._pending):
            n = min(len(self._pending), len(new))
            alpha = (np.arange(1, n + 1, dtype=np.float32) / (n + 1))[:, None, None, None]
            blended = (1 - alpha) * self._pending[:n].astype(np.float32) + alpha * new[:n].astype(np.float32)
            new = np.concatenate([np.round(blended).astype(np.uint8), new[n:]])
        hold = 0 if last else min(self.overlap, len(new))
        out, self._pending = new[: len(new) - hold], new[len(new) - hold :]
        self.emitted += len(out)
        return out

    def flush(self) -> np.ndarray:
        """Frames still held back (used when the video is cut short, e.g. cancelled)."""
        out = self._pending if self._pending is not None else np.zeros((0,), np.uint8)
        self.emitted += len(out)
        self._pending = None
        return out
