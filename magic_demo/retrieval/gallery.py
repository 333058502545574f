"""Gallery folders: finding their images and captions, and drawing galleries: the shipped one of the miniature
world's first frames (``make_world_gallery``) and the placeholder shapes used with the tiny test model
(``make_placeholder_gallery``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CAPTION_SIDECARS = ("captions.json", "captions.jsonl", "captions.tsv")
GALLERY_MAX_PIXELS = 100_000_000
GALLERY_MAX_BYTES = 256 * 1024 * 1024


def iter_images(root: str | os.PathLike) -> list[Path]:
    """Image files under ``root``, recursively, sorted; hidden files and folders are skipped."""
    root = Path(root)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                out.append(Path(dirpath) / name)
    return out


def load_captions(path: str | os.PathLike) -> dict[str, str]:
    """Captions sidecar -> {relative path (posix): caption}.

    ``.json``: {"path": "caption", ...} or [{"path": ..., "caption": ...}, ...]; ``.jsonl``: one such object a
    line; ``.tsv``/``.txt``: ``path<TAB>caption`` lines (``#`` comments allowed)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    out: dict[str, str] = {}
    if path.suffix == ".json":
        data = json.loads(text)
        items = data.items() if isinstance(data, dict) else ((d["path"], d["caption"]) for d in data)
        out = {str(k): str(v) for k, v in items}
    elif path.suffix == ".jsonl":
        for line in text.splitlines():
            if line.strip():
                d = json.loads(line)
                out[str(d["path"])] = str(d["caption"])
    else:
        for line in text.splitlines():
            if line.strip() and not line.startswith("#") and "\t" in line:
                k, v = line.split("\t", 1)
                out[k.strip()] = v.strip()
    return {k.replace("\\", "/"): v for k, v in out.items()}


def _find_sidecar(root: Path) -> Path | None:
    for name in CAPTION_SIDECARS:
        if (root / name).is_file():
            return root / name
    return None


_GALLERY_COLOURS = {
    "red": (220, 30, 30), "green": (40, 190, 40), "blue": (40, 70, 235), "yellow": (240, 220, 30),
    "white": (245, 245, 245), "purple": (145, 50, 200), "orange": (250, 140, 20), "cyan": (30, 210, 220),
}
_GALLERY_BACKGROUNDS = {"black": (12, 12, 12), "grey": (120, 120, 120), "navy": (15, 25, 80), "cream": (240, 230, 200)}
_GALLERY_SHAPES = ("circle", "square", "triangle", "ring", "cross")


def make_placeholder_gallery(out_dir: str | os.PathLike, *, n: int = 40, size: int = 64) -> list[Path]:
    """Draw ``n`` deterministic ``size``x``size`` PNGs of one coloured shape each, with captions.json.

    Placeholder only: the miniature-world issue replaces it with real gallery content."""
    from PIL import ImageDraw

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    colours = list(_GALLERY_COLOURS.items())
    backgrounds = list(_GALLERY_BACKGROUNDS.items())
    captions: dict[str, str] = {}
    paths = []
    for i in range(n):
        shape = _GALLERY_SHAPES[i % len(_GALLERY_SHAPES)]
        cname, col = colours[(i // len(_GALLERY_SHAPES)) % len(colours)]
        bname, bg = backgrounds[(i * 3 + i // 8) % len(backgrounds)]
        if cname == "white" and bname == "cream" or cname == "yellow" and bname == "cream":
            bname, bg = backgrounds[0]
        s = size * 4  # supersample, then downscale for anti-aliasing
        im = Image.new("RGB", (s, s), bg)
        d = ImageDraw.Draw(im)
        r = s * (0.22 + 0.04 * ((i * 7) % 4))
        cx = s * (0.35 + 0.3 * (((i * 5) % 7) / 6))
        cy = s * (0.35 + 0.3 * (((i * 3) % 5) / 4))
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            d.ellipse(box, fill=col)
        elif shape == "square":
            d.rectangle(box, fill=col)
        elif shape == "triangle":
            d.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=col)
        elif shape == "ring":
            d.ellipse(box, outline=col, width=int(r * 0.35))
        else:
            t = r * 0.33
            d.rectangle((cx - r, cy - t, cx + r, cy + t), fill=col)
            d.rectangle((cx - t, cy - r, cx + t, cy + r), fill=col)
        im = im.resize((size, size), Image.Resampling.LANCZOS)
        article = "an" if cname[0] in "aeiou" else "a"
        name = f"{i:03d}_{cname}_{shape}.png"
        im.save(out / name, optimize=False)
        captions[name] = f"{article} {cname} {shape} on a {bname} background"
        paths.append(out / name)
    (out / "captions.json").write_text(json.dumps(captions, indent=1) + "\n")
    return paths


def make_world_gallery(out_dir: str | os.PathLike, *, n: int = 576, size: int = 64, seed: int = 0) -> list[Path]:
    """The retrieval gallery: ``n`` first frames of the miniature world (``magic_demo.world``), deterministic by
    ``seed``, as ``size``x``size`` PNGs with ``captions.json`` (exact world captions) and ``specs.json`` (the
    world spec of each image: shade, size, position, ...).

    The first 480 images cover every (colour, shape, motion, background) caption once, the next 96 every
    (colour, shape, background) once more; beyond that (or for n < 576, a prefix of the shuffled list) specs are
    sampled freely.  Shade, size and start position always vary (world jitter)."""
    import itertools

    from magic_demo import world

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):  # a stale image would be indexed with a missing caption
        old.unlink()
    rng = np.random.default_rng([seed, 0x6A11])
    fields = []
    for c, s, m, b in itertools.product(world.COLOURS, world.SHAPES, world.MOTIONS, world.BACKGROUNDS):
        fields.append(dict(colour=c, shape=s, motion=m, background=b))
    for c, s, b in itertools.product(world.COLOURS, world.SHAPES, world.BACKGROUNDS):
        fields.append(dict(colour=c, shape=s, background=b))
    fields = [fields[i] for i in rng.permutation(len(fields))]
    while len(fields) < n:
        fields.append({})
    captions: dict[str, str] = {}
    specs: dict[str, Any] = {}
    paths = []
    for i, f in enumerate(fields[:n]):
        spec = world.sample_spec(rng, **f)
        name = f"{i:04d}_{spec.colour}_{spec.shape}_{spec.background.replace(' ', '-')}.png"
        Image.fromarray(world.render_first_frame(spec, size=size)).save(out / name, optimize=True)
        captions[name] = world.caption(spec)
        specs[name] = spec.to_dict()
        paths.append(out / name)
    (out / "captions.json").write_text(json.dumps(captions, indent=0) + "\n")
    (out / "specs.json").write_text(json.dumps(specs, separators=(",", ":")) + "\n")
    return paths
