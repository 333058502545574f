"""The miniature world: one coloured shape moving over a plain background.

Grammar (issue 5), captions read exactly::

    a|an <colour> <shape> <motion> on a <background> background

e.g. "an orange circle moves left on a navy background".  Clips are rendered
procedurally (anti-aliased by supersampling), deterministically from a
``ClipSpec``; ``sample_spec(rng)`` draws a random spec with shade jitter, size
and start-position variation.  Miniature defaults: 64x64 pixels, 8 fps.

The module also has a small analyser (``find_shape`` and friends) that locates
the shape in a frame by its colour distance to the background; the evaluator
uses it to check motion direction, colour and shape of generated videos.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 30, 30),
    "green": (40, 190, 40),
    "blue": (40, 70, 235),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
    "purple": (145, 50, 200),
    "orange": (245, 135, 20),
    "cyan": (30, 210, 220),
}
BACKGROUNDS = {
    "black": (0, 0, 0),
    "gray": (110, 110, 110),
    "navy": (15, 20, 95),
    "dark green": (15, 80, 25),
}
# unit direction (dx, dy) in image coordinates (y grows downwards)
MOTIONS = {
    "moves left": (-1.0, 0.0),
    "moves right": (1.0, 0.0),
    "moves up": (0.0, -1.0),
    "moves down": (0.0, 1.0),
    "stays still": (0.0, 0.0),
}
SPEED_RANGE = (0.10, 0.25)  # fraction of the frame width per second
SIZE_RANGE = (0.10, 0.18)  # half extent of the shape, fraction of the frame width
LEAD_SECONDS = 1.5  # a sampled clip moves as captioned for at least this long
DEFAULT_SIZE = 64
DEFAULT_FPS = 8


@dataclass
class ClipSpec:
    shape: str
    colour: str
    motion: str
    background: str
    rgb: tuple = None  # jittered shape colour (0..255); None = the base colour
    bg_rgb: tuple = None  # jittered background colour; None = the base colour
    radius: float = 0.14  # half extent, fraction of frame width
    x0: float = 0.5  # start centre, fractions of the frame
    y0: float = 0.5
    speed: float = 0.15  # fraction of frame width per second

    def __post_init__(self):
        for value, allowed, what in ((self.shape, SHAPES, "shape"), (self.colour, COLOURS, "colour"),
                                     (self.motion, MOTIONS, "motion"), (self.background, BACKGROUNDS, "background")):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; expected one of {list(allowed)}")
        if self.rgb is None:
            self.rgb = COLOURS[self.colour]
        if self.bg_rgb is None:
            self.bg_rgb = BACKGROUNDS[self.background]
        self.rgb = tuple(int(c) for c in self.rgb)
        self.bg_rgb = tuple(int(c) for c in self.bg_rgb)

    def to_dict(self):
        return asdict(self)


def _rng(rng):
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _jitter_colour(rng, base, shade=(0.8, 1.0), noise=12):
    c = np.asarray(base, float) * rng.uniform(*shade) + rng.uniform(-noise, noise, 3)
    return tuple(int(v) for v in np.clip(np.round(c), 0, 255))


def sample_spec(rng=None, shape=None, colour=None, motion=None, background=None,
                bounce_within: Optional[float] = None) -> ClipSpec:
    """Draw a random clip spec (deterministic for a seed or Generator); fixed fields may be given.

    By default the shape moves as captioned for at least LEAD_SECONDS before its first bounce. With
    `bounce_within` (seconds) it starts instead so close to the wall it moves toward that it reaches it within that
    time, touching it included: where a sliding window's later windows start, as the captioned motion keeps
    pushing the shape into the wall."""
    if bounce_within is not None and bounce_within < 0:
        raise ValueError(f"bounce_within must be >= 0 seconds, got {bounce_within!r}")
    rng = _rng(rng)
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    colour = colour or list(COLOURS)[rng.integers(len(COLOURS))]
    motion = motion or list(MOTIONS)[rng.integers(len(MOTIONS))]
    background = background or list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    radius = rng.uniform(*SIZE_RANGE)
    speed = rng.uniform(*SPEED_RANGE)
    rgb = _jitter_colour(rng, COLOURS[colour])
    bg_rgb = _jitter_colour(rng, BACKGROUNDS[background], shade=(0.85, 1.15), noise=8)
    # start so that the shape travels in the captioned direction for at least LEAD_SECONDS before a bounce
    lo, hi = radius, 1 - radius
    room = min(speed * LEAD_SECONDS, 0.5 * (hi - lo))
    start = []
    for d in MOTIONS[motion]:
        if bounce_within is not None and d:
            reach = min(speed * bounce_within, hi - lo)
            a, b = (hi - reach, hi) if d > 0 else (lo, lo + reach)
        else:
            a, b = (lo, hi - room) if d > 0 else ((lo + room, hi) if d < 0 else (lo, hi))
        start.append(rng.uniform(a, b))
    return ClipSpec(shape, colour, motion, background, rgb=rgb, bg_rgb=bg_rgb, radius=radius,
                    x0=start[0], y0=start[1], speed=speed)


def caption(spec) -> str:
    article = "an" if spec.colour[0] in "aeiou" else "a"
    return f"{article} {spec.colour} {spec.shape} {spec.motion} on a {spec.background} background"


def _alt(words):
    return "|".join(re.escape(w) for w in words)


_CAPTION_RE = re.compile(
    rf"^(a|an) ({_alt(COLOURS)}) ({_alt(SHAPES)}) ({_alt(MOTIONS)}) on an? ({_alt(BACKGROUNDS)}) background$")


def parse_caption(text: str) -> dict:
    """Parse a world caption into {shape, colour, motion, background}; ValueError if it is not one.

    Case, surrounding spaces, repeated spaces and a final full stop are forgiven; the wrong article is too
    (users write "a orange ..."), the words themselves must be the world's vocabulary.
    """
    norm = " ".join(str(text).lower().strip().rstrip(".").split())
    m = _CAPTION_RE.match(norm)
    if not m:
        raise ValueError(
            f"not a world caption: {text!r}; expected 'a|an <colour> <shape> <motion> on a <background> background' "
            f"with colour in {list(COLOURS)}, shape in {list(SHAPES)}, motion in {list(MOTIONS)}, "
            f"background in {list(BACKGROUNDS)}")
    return {"colour": m.group(2), "shape": m.group(3), "motion": m.group(4), "background": m.group(5)}


def spec_from_caption(text: str, rng=None) -> ClipSpec:
    """A random spec (shade, size, position, speed) that matches a caption."""
    return sample_spec(rng, **parse_caption(text))


def _bounce(p, lo, hi):
    """Reflect positions p into [lo, hi] (a ball bouncing between two walls)."""
    span = hi - lo
    u = np.mod(p - lo, 2 * span)
    return lo + np.where(u > span, 2 * span - u, u)


def trajectory(spec: ClipSpec, num_frames: int, fps: float = DEFAULT_FPS):
    """Centre (x, y) per frame as fractions of the frame, with bouncing at the edges."""
    t = np.arange(num_frames) / float(fps)
    dx, dy = MOTIONS[spec.motion]
    lo, hi = spec.radius, 1.0 - spec.radius
    x = _bounce(spec.x0 + dx * spec.speed * t, lo, hi)
    y = _bounce(spec.y0 + dy * spec.speed * t, lo, hi)
    return np.stack([x, y], axis=1)


def _coverage(shape, r, cx, cy, size, ss):
    """Fractional coverage [T,H,W] of the shape, by supersampling ss x ss per pixel."""
    n = size * ss
    g = (np.arange(n) + 0.5) / n
    X = g[None, None, :] - np.asarray(cx)[:, None, None]
    Y = g[None, :, None] - np.asarray(cy)[:, None, None]
    if shape == "circle":
        m = X * X + Y * Y <= r * r
    elif shape == "square":
        h = 0.9 * r
        m = (np.abs(X) <= h) & (np.abs(Y) <= h)
    else:  # upright isosceles triangle in the box [-r, r]^2: apex on top
        m = (Y <= r) & (np.abs(X) <= (Y + r) / 2)
    T = m.shape[0]
    return m.reshape(T, size, ss, size, ss).mean(axis=(2, 4))


def render_clip(spec: ClipSpec, num_frames: int, size: int = DEFAULT_SIZE, fps: float = DEFAULT_FPS,
                supersample: int = 4) -> np.ndarray:
    """Render a clip as uint8 [T, H, W, 3]; a pure function of its arguments."""
    return render_at(spec, trajectory(spec, num_frames, fps), size, supersample)


def render_at(spec: ClipSpec, centres, size: int = DEFAULT_SIZE, supersample: int = 4) -> np.ndarray:
    """The spec's shape drawn at the given centres ([T, 2], (x, y) fractions of the frame): uint8 [T, H, W, 3]."""
    centres = np.asarray(centres, np.float64).reshape(-1, 2)
    a = _coverage(spec.shape, spec.radius, centres[:, 0], centres[:, 1], size, supersample)[..., None]
    bg = np.asarray(spec.bg_rgb, np.float32)
    fg = np.asarray(spec.rgb, np.float32)
    img = bg * (1 - a) + fg * a
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def render_first_frame(spec: ClipSpec, size: int = DEFAULT_SIZE, supersample: int = 4) -> np.ndarray:
    """The first frame, uint8 [H, W, 3]."""
    return render_clip(spec, 1, size=size, supersample=supersample)[0]


def sample_clip(seed, num_frames: int, size: int = DEFAULT_SIZE, fps: float = DEFAULT_FPS):
    """(spec, caption, clip) for a seed: the usual way to make training data."""
    spec = sample_spec(seed)
    return spec, caption(spec), render_clip(spec, num_frames, size, fps)


# ---------------------------------------------------------------- analysis (used by the evaluator)

def estimate_background(frame: np.ndarray) -> np.ndarray:
    """Median colour of the frame border (the shape never covers the whole border)."""
    f = np.asarray(frame, np.float32)
    border = np.concatenate([f[0], f[-1], f[:, 0], f[:, -1]], axis=0)
    return np.median(border, axis=0)


def find_shape(frame: np.ndarray, background=None, threshold: float = 40.0):
    """Locate the shape in one frame [H, W, 3] by colour distance to the background.

    Returns a dict: mask [H, W] bool, centroid (x, y) in pixels or None, area (pixels), colour (mean RGB of the
    mask's pixels, the most shape-like half, or None) and background (RGB used).
    """
    f = np.asarray(frame, np.float32)
    bg = estimate_background(f) if background is None else np.asarray(background, np.float32)
    dist = np.linalg.norm(f - bg, axis=-1)
    mask = dist > threshold
    area = int(mask.sum())
    if area == 0:
        return {"mask": mask, "centroid": None, "area": 0, "colour": None, "background": bg}
    ys, xs = np.nonzero(mask)
    core = dist[mask] >= np.median(dist[mask])  # skip anti-aliased edge pixels
    colour = f[mask][core].mean(axis=0)
    return {"mask": mask, "centroid": (float(xs.mean()), float(ys.mean())), "area": area,
            "colour": colour, "background": bg}


def classify_colour(rgb) -> str:
    """Nearest world colour to an RGB value, allowing for shade (a scale factor) as in the jitter."""
    c = np.asarray(rgb, np.float64)
    best, best_err = None, np.inf
    for name, base in COLOURS.items():
        b = np.asarray(base, np.float64)
        s = np.clip(c @ b / (b @ b), 0.6, 1.15)
        err = np.linalg.norm(c - s * b)
        if err < best_err:
            best, best_err = name, err
    return best


# Area / r^2 of each shape as `_coverage` draws it, and its centroid's offset below the centre (in r): what a
# template needs to be placed and sized like a mask.
_SHAPE_AREA = {"circle": np.pi, "square": 1.8**2, "triangle": 2.0}
_CENTROID_BELOW_CENTRE = {"circle": 0.0, "square": 0.0, "triangle": 1.0 / 3.0}


def shape_match(mask: np.ndarray) -> dict[str, float]:
    """IoU of the mask with each world shape drawn with the mask's area at its centroid (upright, as rendered)."""
    mask = np.asarray(mask, bool)
    h, w = mask.shape
    n = max(h, w)
    ys, xs = np.nonzero(mask)
    cx, cy = (xs.mean() + 0.5) / n, (ys.mean() + 0.5) / n
    out = {}
    for shape in SHAPES:
        r = np.sqrt(mask.sum() / _SHAPE_AREA[shape]) / n
        template = _coverage(shape, r, [cx], [cy - _CENTROID_BELOW_CENTRE[shape] * r], n, 4)[0, :h, :w] >= 0.5
        out[shape] = float((template & mask).sum() / (template | mask).sum())
    return out


def classify_shape(mask: np.ndarray) -> str | None:
    """circle / square / triangle: the world shape whose template (same area, same centroid) overlaps the mask
    most. Unlike the fill of the bounding box (the rule before session 14), a square tilted by a few degrees or
    with slightly rounded corners stays a square, and a rounded blob is judged against circle and square alike."""
    if mask is None or np.sum(mask) < 4:
        return None
    match = shape_match(mask)
    return max(match, key=match.get)


def classify_motion(centroids, size: int = DEFAULT_SIZE, fps: float = DEFAULT_FPS, min_speed: float = 0.04) -> str:
    """Motion class from per-frame centroids (pixels), judged before the first bounce.

    Uses the median frame-to-frame step over the first frames; "stays still" below min_speed (fraction of the
    width per second).
    """
    pts = np.asarray([c for c in centroids if c is not None], np.float64)
    if len(pts) < 2:
        return "stays still"
    steps = np.diff(pts[: max(2, min(len(pts), int(fps) + 1))], axis=0)
    dx, dy = np.median(steps, axis=0)
    if max(abs(dx), abs(dy)) * fps / size < min_speed:
        return "stays still"
    if abs(dx) >= abs(dy):
        return "moves right" if dx > 0 else "moves left"
    return "moves down" if dy > 0 else "moves up"


def analyse_clip(clip: np.ndarray, background=None, fps: float = DEFAULT_FPS) -> dict:
    """Per-clip summary: motion, colour and shape classes (majority over frames) and per-frame centroids."""
    clip = np.asarray(clip)
    bg = estimate_background(clip[0]) if background is None else background
    found = [find_shape(f, bg) for f in clip]
    cents = [d["centroid"] for d in found]
    colours = [classify_colour(d["colour"]) for d in found if d["colour"] is not None]
    shapes = [s for s in (classify_shape(d["mask"]) for d in found) if s]

    def majority(xs):
        return max(set(xs), key=xs.count) if xs else None

    return {"motion": classify_motion(cents, clip.shape[2], fps), "colour": majority(colours),
            "shape": majority(shapes), "centroids": cents, "colours": colours, "shapes": shapes,
            "present": [d["area"] > 0 for d in found]}
