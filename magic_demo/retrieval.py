"""Retrieved first frames: R(y) = argmax over a gallery of cosine(phi(text), psi(image)).

A :class:`RetrievalIndex` embeds a folder of images with an open_clip model (L2-normalised embeddings) and
searches them with faiss by inner product: exact ``IndexFlatIP`` below ``approx_threshold`` vectors, an
approximate ``IndexHNSWFlat`` (inner product) at or above it (recall measured in tests and the benchmark).

The CLIP model is a parameter, :class:`ClipModelSpec`: an open_clip architecture name with a pretrained tag
or a local checkpoint file, a ``local-dir:`` model folder, or a custom config registered under a name
(``magic-tiny-clip``, a tiny random model, is registered here for tests and the placeholder gallery).
``magic-mini-clip`` is the trained miniature CLIP shipped in ``assets/mini/clip`` (``magic_demo.train.clip``):
``ClipModelSpec.parse("magic-mini-clip")`` loads it; it embeds the shipped world gallery (``assets/gallery``,
``make_world_gallery``) whose index is ``assets/gallery_index``. Local ``.safetensors`` checkpoints are read
without pickle (compact embedding tables allowed, :func:`save_clip_safetensors`); other checkpoint files go
through open_clip with ``torch.load(weights_only=True)``. A local checkpoint is recorded in the index both by
absolute path and relative to the index folder, so an index and its model can move together.
The spec and a model id are recorded in the index metadata, and loading with another model is refused.

On disk an index is a directory::

    meta.json      format name + version, model spec + id, dim, count, index type, gallery root, checksums
    entries.json   [{"path": <relative to the gallery root, or absolute>, "caption": str|null}, ...]
    index.faiss    faiss.serialize_index bytes

``save`` writes a temporary sibling directory, fsyncs it and swaps it in with renames (old -> ``.NAME.bak``,
temp -> NAME, then the backup is deleted). If a crash lands between the two renames, ``load`` reads the
backup (the previous index) and the next ``save`` repairs the layout, so a crash never leaves a broken index.

CLI (registered on the main parser by :func:`add_index_cli`; also ``python -m magic_demo.retrieval``)::

    index build  --images DIR --out INDEX_DIR [--model ARCH[@PRETRAINED]] [--model-config CFG.json]
    index add    --index INDEX_DIR PATH [PATH ...]
    index search --index INDEX_DIR (--query TEXT | --image PATH) [-k 5] [--json]
    index make-gallery --out DIR [--index-out INDEX_DIR] [--kind world|placeholder] [--model magic-mini-clip]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from magic_demo.first_frame import FirstFrame, FirstFrameError, fit_to_bucket, open_image_checked

log = logging.getLogger(__name__)

FORMAT_NAME = "magic-demo-retrieval-index"
FORMAT_VERSION = 1
DEFAULT_APPROX_THRESHOLD = 20_000
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CAPTION_SIDECARS = ("captions.json", "captions.jsonl", "captions.tsv")
GALLERY_MAX_PIXELS = 100_000_000
GALLERY_MAX_BYTES = 256 * 1024 * 1024

# A tiny random CLIP (~1.6M parameters, 32-d embeddings): the placeholder gallery's model and the tests'.
TINY_CLIP_NAME = "magic-tiny-clip"
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
DEFAULT_MODEL = TINY_CLIP_NAME

# The trained miniature retrieval CLIP (``python -m magic_demo.train.clip``): open_clip config + safetensors weights.
MINI_CLIP_NAME = "magic-mini-clip"
MINI_CLIP_DIR = Path(__file__).resolve().parents[1] / "assets" / "mini" / "clip"
CLIP_CONFIG_FILE = "open_clip_config.json"
CLIP_WEIGHTS_FILE = "open_clip_model.safetensors"
_COMPACT_IDS, _COMPACT_ROWS = ".compact_ids", ".compact_rows"

# Indirection so tests can simulate a crash in the middle of ``save``.
_rename = os.rename


# --------------------------------------------------------------------------------------------- errors
class RetrievalIndexError(ValueError):
    """Base class of index errors; the message says what is wrong and what to do."""


class IndexNotFoundError(RetrievalIndexError):
    pass


class IndexCorruptError(RetrievalIndexError):
    pass


class IndexVersionError(RetrievalIndexError):
    pass


class ModelMismatchError(RetrievalIndexError):
    pass


class DimensionMismatchError(ModelMismatchError):
    pass


# --------------------------------------------------------------------------------------------- model spec
_CONFIG_DIR: Path | None = None


def register_clip_config(name: str, config: dict[str, Any]) -> None:
    """Register an open_clip model config under ``name`` (through open_clip's public add_model_config)."""
    import open_clip
    from open_clip.factory import get_model_config

    if get_model_config(name) == config:
        return
    global _CONFIG_DIR
    if _CONFIG_DIR is None:
        _CONFIG_DIR = Path(tempfile.mkdtemp(prefix="magic_demo_open_clip_cfg_"))
    if not all(k in config for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ValueError(f"open_clip config for {name!r} needs embed_dim, vision_cfg and text_cfg")
    path = _CONFIG_DIR / f"{name}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)


def save_clip_safetensors(state_dict: dict[str, Any], path: str | os.PathLike, *,
                           compact: Sequence[str] = ("token_embedding.weight",),
                           metadata: dict[str, str] | None = None) -> Path:
    """Write a CLIP state dict as safetensors; the matrices named in ``compact`` (large embedding tables of which
    only a few rows are non-zero, e.g. the 49,408-token table when training used a small vocabulary) are stored as
    their non-zero rows plus row ids (``KEY.compact_ids`` / ``KEY.compact_rows``); :func:`load_clip_state_dict`
    expands them back exactly (the other rows are zero)."""
    import torch
    from safetensors.torch import save_file

    out: dict[str, Any] = {}
    meta = dict(metadata or {})
    for k, v in state_dict.items():
        v = v.detach().to("cpu").contiguous()
        if k in compact and v.ndim == 2:
            ids = torch.nonzero(v.abs().sum(dim=1) > 0).flatten()
            out[k + _COMPACT_IDS] = ids.to(torch.int64).contiguous()
            out[k + _COMPACT_ROWS] = v[ids].contiguous()
            meta[k + ".shape"] = json.dumps(list(v.shape))
        else:
            out[k] = v
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path), metadata=meta)
    return path


def load_clip_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Read a safetensors CLIP state dict (no pickle), expanding compact embedding tables."""
    import torch
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        raw = {k: f.get_tensor(k) for k in f.keys()}
    sd: dict[str, Any] = {}
    for k, v in raw.items():
        if k.endswith(_COMPACT_ROWS):
            continue
        if k.endswith(_COMPACT_IDS):
            base = k[: -len(_COMPACT_IDS)]
            rows = raw[base + _COMPACT_ROWS]
            shape = json.loads(meta.get(base + ".shape", "null")) or [int(v.max()) + 1, rows.shape[1]]
            full = torch.zeros(shape, dtype=rows.dtype)
            full[v.long()] = rows
            sd[base] = full
        else:
            sd[k] = v
    return sd


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_fingerprint(path: Path) -> str:
    """size + sha256 of the first and last 4 MiB: cheap even for multi-GB checkpoints."""
    n = path.stat().st_size
    h = hashlib.sha256(str(n).encode())
    with open(path, "rb") as f:
        h.update(f.read(4 << 20))
        if n > 8 << 20:
            f.seek(-(4 << 20), os.SEEK_END)
            h.update(f.read())
    return h.hexdigest()[:16]


@dataclass
class ClipModelSpec:
    """Which open_clip model embeds the gallery.

    arch:        open_clip architecture (``ViT-B-32``), ``local-dir:/path``, or a name registered with ``config``.
    pretrained:  a pretrained tag (``openai``, ``laion2b_s34b_b79k``) or a local checkpoint file; ``None`` means
                 random weights drawn with ``seed`` (tiny test/placeholder models).
    config:      a custom open_clip config, registered under ``arch`` before the model is built.
    """

    arch: str = DEFAULT_MODEL
    pretrained: str | None = None
    config: dict[str, Any] | None = None
    seed: int = 0

    @classmethod
    def parse(cls, text: str, *, config_file: str | os.PathLike | None = None, seed: int = 0) -> "ClipModelSpec":
        """``ARCH[@PRETRAINED]``; ``config_file`` registers a custom config (arch defaults to its stem).

        ``magic-mini-clip`` alone is the shipped trained miniature CLIP (:meth:`mini`). A ``.safetensors``
        checkpoint with an ``open_clip_config.json`` beside it brings its own config when ``ARCH`` is not one of
        open_clip's built-in architectures and no ``config_file`` is given."""
        arch, _, pretrained = (text or "").partition("@")
        if arch == MINI_CLIP_NAME and not pretrained and config_file is None:
            return cls.mini()
        config = None
        if config_file is None and pretrained and pretrained.endswith(".safetensors") and arch:
            sibling = Path(pretrained).parent / CLIP_CONFIG_FILE
            if sibling.is_file() and not _builtin_config(arch):
                config_file = sibling
        if config_file is not None:
            config = json.loads(Path(config_file).read_text())
            config = config.get("model_cfg", config)
            arch = arch or Path(config_file).stem
        return cls(arch=arch or DEFAULT_MODEL, pretrained=pretrained or None, config=config, seed=seed)

    @classmethod
    def mini(cls, model_dir: str | os.PathLike | None = None, arch: str = MINI_CLIP_NAME) -> "ClipModelSpec":
        """The trained miniature CLIP exported by ``magic_demo.train.clip`` (default: ``assets/mini/clip``)."""
        d = Path(model_dir) if model_dir is not None else MINI_CLIP_DIR
        cfg_path, weights = d / CLIP_CONFIG_FILE, d / CLIP_WEIGHTS_FILE
        if not cfg_path.is_file() or not weights.is_file():
            raise FileNotFoundError(f"no trained CLIP in {d} (need {CLIP_CONFIG_FILE} and {CLIP_WEIGHTS_FILE}); "
                                    "train one with `python -m magic_demo.train.clip`")
        config = json.loads(cfg_path.read_text())
        return cls(arch=arch, pretrained=str(weights), config=config.get("model_cfg", config))

    def register(self) -> None:
        if self.config is not None:
            register_clip_config(self.arch, self.config)
        elif self.arch == TINY_CLIP_NAME:
            register_clip_config(TINY_CLIP_NAME, TINY_CLIP_CONFIG)

    def resolved_config(self) -> dict[str, Any] | None:
        from open_clip.factory import get_model_config

        self.register()
        if self.arch.startswith("hf-hub:"):
            return None  # would need the network
        try:
            return get_model_config(self.arch)
        except Exception:
            return None

    @property
    def model_id(self) -> str:
        """Stable identity of the embedding function: arch, weights and (hash of) the config."""
        if self.pretrained is None:
            weights = f"random(seed={self.seed})"
        elif Path(self.pretrained).is_file():
            weights = f"file:{Path(self.pretrained).name}:{_file_fingerprint(Path(self.pretrained))}"
        else:
            weights = self.pretrained
        cfg = self.resolved_config()
        cfg_tag = f"#cfg:{_sha(json.dumps(cfg, sort_keys=True).encode())[:12]}" if cfg is not None else ""
        arch = self.arch
        if arch.startswith("local-dir:"):
            arch = "local-dir:" + Path(arch[len("local-dir:"):]).name
        return f"open_clip:{arch}@{weights}{cfg_tag}"

    def to_dict(self, base: str | os.PathLike | None = None) -> dict[str, Any]:
        """As a dict; a local checkpoint is stored by absolute path and, with ``base`` (the index folder), also
        relative to it (``pretrained_rel``), so an index and its model can move together (a fresh clone)."""
        d = asdict(self)
        if self.pretrained is not None and Path(self.pretrained).is_file():
            d["pretrained"] = str(Path(self.pretrained).resolve())
            if base is not None:
                d["pretrained_rel"] = Path(os.path.relpath(d["pretrained"], Path(base).resolve())).as_posix()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], base: str | os.PathLike | None = None) -> "ClipModelSpec":
        """Inverse of :meth:`to_dict`; ``pretrained_rel`` (resolved against ``base``) wins when that file exists."""
        pretrained = d.get("pretrained")
        if d.get("pretrained_rel") and base is not None and (Path(base) / d["pretrained_rel"]).is_file():
            pretrained = str((Path(base) / d["pretrained_rel"]).resolve())
        return cls(arch=d["arch"], pretrained=pretrained, config=d.get("config"), seed=int(d.get("seed", 0)))


def _builtin_config(arch: str) -> bool:
    """Whether ``arch`` is one of open_clip's own architectures (not one registered at run time)."""
    import open_clip

    return (Path(open_clip.__file__).parent / "model_configs" / f"{arch}.json").is_file()


class ClipEmbedder:
    """An open_clip model that turns images and texts into L2-normalised float32 vectors."""

    def __init__(self, spec: ClipModelSpec | str | None = None, *, device: str = "cpu", batch_size: int = 32) -> None:
        import open_clip
        import torch

        if spec is None:
            spec = ClipModelSpec()
        elif isinstance(spec, str):
            spec = ClipModelSpec.parse(spec)
        self.spec = spec
        self.device = device
        self.batch_size = batch_size
        spec.register()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            root = logging.getLogger()
            level = root.level
            # a local .safetensors file is read by load_clip_state_dict (compact embedding tables, no pickle)
            own_weights = spec.pretrained is not None and str(spec.pretrained).endswith(".safetensors") \
                and Path(spec.pretrained).is_file()
            if spec.pretrained is None or own_weights:
                root.setLevel(logging.ERROR)  # "initialized randomly" is the point here, not a warning
            try:
                model, _, preprocess = open_clip.create_model_and_transforms(
                    spec.arch, pretrained=None if own_weights else spec.pretrained, device=device
                )
            finally:
                root.setLevel(level)
            if own_weights:
                model.load_state_dict(load_clip_state_dict(spec.pretrained), strict=True)
                model.to(device)
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(spec.arch)
        self.model_id = spec.model_id
        with torch.no_grad():
            self.dim = int(self.embed_texts([""]).shape[1])

    def _normalise(self, x: Any) -> np.ndarray:
        v = x.detach().float().cpu().numpy().astype(np.float32)
        n = np.linalg.norm(v, axis=1, keepdims=True)
        return v / np.maximum(n, 1e-12)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        import torch

        if not images:
            return np.zeros((0, getattr(self, "dim", 0)), np.float32)
        x = torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device)
        with torch.no_grad():
            return self._normalise(self.model.encode_image(x))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        tokens = self.tokenizer(list(texts)).to(self.device)
        with torch.no_grad():
            return self._normalise(self.model.encode_text(tokens))


def _as_embedder(model: "ClipEmbedder | ClipModelSpec | str | None", device: str = "cpu") -> ClipEmbedder:
    if isinstance(model, ClipEmbedder):
        return model
    return ClipEmbedder(model, device=device)


# --------------------------------------------------------------------------------------------- gallery helpers
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


@dataclass
class SearchHit:
    path: str  # absolute path of the gallery image
    rel_path: str  # as stored in the index (relative to the gallery root when inside it)
    caption: str | None
    score: float  # cosine similarity
    rank: int
    id: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _backup_path(index_dir: Path) -> Path:
    return index_dir.parent / f".{index_dir.name}.bak"


# --------------------------------------------------------------------------------------------- the index
class RetrievalIndex:
    """Gallery of images searchable by text or image (see the module docstring)."""

    def __init__(
        self,
        embedder: ClipEmbedder | None,
        *,
        dim: int | None = None,
        root: str | os.PathLike | None = None,
        approx_threshold: int = DEFAULT_APPROX_THRESHOLD,
        hnsw_m: int = 32,
        ef_construction: int = 80,
        ef_search: int = 128,
        model_spec: dict[str, Any] | None = None,
        model_id: str | None = None,
    ) -> None:
        import faiss

        if embedder is None and dim is None:
            raise ValueError("a vector-only index (no embedder) needs dim")
        self.embedder = embedder
        self.dim = int(embedder.dim if embedder is not None else dim)
        if embedder is not None and dim is not None and int(dim) != embedder.dim:
            raise DimensionMismatchError(f"embedder gives {embedder.dim}-d vectors, index is {dim}-d")
        self.model_spec = model_spec if model_spec is not None else (embedder.spec.to_dict() if embedder else None)
        self.model_id = model_id if model_id is not None else (embedder.model_id if embedder else None)
        self.root = Path(root).resolve() if root is not None else None
        self.approx_threshold = int(approx_threshold)
        self.hnsw_m, self.ef_construction, self.ef_search = int(hnsw_m), int(ef_construction), int(ef_search)
        self.entries: list[dict[str, Any]] = []
        self.index = faiss.IndexFlatIP(self.dim)
        self.stats: dict[str, Any] = {"added": 0, "skipped": 0, "skipped_files": [], "duplicates": 0}
        self.loaded_from_backup = False

    # ---- properties
    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def index_type(self) -> str:
        import faiss

        return "hnsw" if isinstance(self.index, faiss.IndexHNSWFlat) else "flat"

    # ---- construction
    @classmethod
    def build(
        cls,
        image_dir: str | os.PathLike,
        model_spec: ClipEmbedder | ClipModelSpec | str | None = None,
        *,
        captions: str | os.PathLike | dict[str, str] | None = None,
        batch_size: int = 32,
        progress: bool = True,
        device: str = "cpu",
        approx_threshold: int = DEFAULT_APPROX_THRESHOLD,
        **kwargs: Any,
    ) -> "RetrievalIndex":
        """Embed every image under ``image_dir`` (recursive). Unreadable files are skipped and counted in
        ``stats``. Captions come from ``captions`` or a ``captions.{json,jsonl,tsv}`` sidecar in the folder,
        or a ``<image stem>.txt`` beside each image."""
        root = Path(image_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"gallery folder not found: {root}")
        embedder = _as_embedder(model_spec, device)
        idx = cls(embedder, root=root, approx_threshold=approx_threshold, **kwargs)
        idx.add(iter_images(root), captions=captions, batch_size=batch_size, progress=progress)
        return idx

    def _rel(self, path: Path) -> str:
        p = path.resolve()
        if self.root is not None:
            with contextlib.suppress(ValueError):
                return p.relative_to(self.root).as_posix()
        return p.as_posix()

    def resolve(self, rel_path: str) -> Path:
        p = Path(rel_path)
        if p.is_absolute() or self.root is None:
            return p
        return self.root / p

    def add(
        self,
        paths: Iterable[str | os.PathLike],
        *,
        captions: str | os.PathLike | dict[str, str] | None = None,
        batch_size: int = 32,
        progress: bool = True,
    ) -> dict[str, Any]:
        """Embed and add images (folders are expanded recursively). Images already in the index are skipped
        (``duplicates``), unreadable ones skipped and counted (``skipped``). Returns this call's stats."""
        from tqdm.auto import tqdm

        if self.embedder is None:
            raise RetrievalIndexError("this index has no embedding model; use add_vectors")
        files: list[Path] = []
        for p in paths:
            p = Path(p)
            files.extend(iter_images(p) if p.is_dir() else [p])
        if self.root is None and files:
            self.root = Path(os.path.commonpath([str(f.resolve().parent) for f in files]))
        cap_map: dict[str, str] = {}
        if isinstance(captions, dict):
            cap_map = {k.replace("\\", "/"): v for k, v in captions.items()}
        elif captions is not None:
            cap_map = load_captions(captions)
        sidecars: dict[Path, dict[str, str]] = {}

        known = {e["path"] for e in self.entries}
        todo: list[tuple[Path, str]] = []
        stats: dict[str, Any] = {"added": 0, "skipped": 0, "skipped_files": [], "duplicates": 0}
        for f in files:
            rel = self._rel(f)
            if rel in known:
                stats["duplicates"] += 1
                continue
            known.add(rel)
            todo.append((f, rel))

        bar = tqdm(total=len(todo), desc="embedding gallery", unit="img", disable=not progress, leave=False)
        try:
            for start in range(0, len(todo), batch_size):
                images, entries = [], []
                for f, rel in todo[start:start + batch_size]:
                    try:
                        img, _ = open_image_checked(
                            f, max_bytes=GALLERY_MAX_BYTES, max_pixels=GALLERY_MAX_PIXELS,
                            draft_size=(512, 512),
                        )
                        img.thumbnail((1024, 1024))  # CLIP sees <= 448 px; keeps the batch small
                    except (FirstFrameError, OSError) as e:
                        stats["skipped"] += 1
                        stats["skipped_files"].append({"path": rel, "reason": str(e)})
                        log.warning("skipping unreadable gallery image %s: %s", f, e)
                        continue
                    caption = cap_map.get(rel) or cap_map.get(f.name) or self._sidecar_caption(f, sidecars)
                    images.append(img)
                    entries.append({"path": rel, "caption": caption})
                if images:
                    self.add_vectors(self.embedder.embed_images(images), entries)
                    stats["added"] += len(images)
                bar.update(len(todo[start:start + batch_size]))
        finally:
            bar.close()
        for k in ("added", "skipped", "duplicates"):
            self.stats[k] += stats[k]
        self.stats["skipped_files"].extend(stats["skipped_files"])
        return stats

    def _sidecar_caption(self, f: Path, cache: dict[Path, dict[str, str]]) -> str | None:
        """Caption from the nearest captions.{json,jsonl,tsv} in the image's folder or a parent folder up to the
        gallery root (keys relative to the sidecar's folder), else from ``<image stem>.txt``."""
        f = f.resolve()
        stop = f.parent
        if self.root is not None and f.is_relative_to(self.root):
            stop = self.root
        d = f.parent
        while True:
            if d not in cache:
                side = _find_sidecar(d)
                try:
                    cache[d] = load_captions(side) if side is not None else {}
                except (OSError, ValueError, KeyError, TypeError) as e:
                    log.warning("ignoring unreadable captions file %s: %s", side, e)
                    cache[d] = {}
            caption = cache[d].get(f.relative_to(d).as_posix())
            if caption is not None:
                return caption
            if d == stop or d.parent == d:
                break
            d = d.parent
        txt = f.with_suffix(".txt")
        if txt.is_file():
            return txt.read_text(encoding="utf-8").strip() or None
        return None

    def _new_hnsw(self) -> Any:
        import faiss

        index = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = self.ef_construction
        index.hnsw.efSearch = self.ef_search
        return index

    def add_vectors(self, vectors: np.ndarray, entries: Sequence[dict[str, Any]] | None = None) -> None:
        """Add precomputed (n, dim) vectors (normalised here). Switches the faiss index from exact to HNSW
        when the total reaches ``approx_threshold``."""
        v = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
        if v.ndim != 2 or v.shape[1] != self.dim:
            raise DimensionMismatchError(f"vectors of shape {v.shape} do not fit a {self.dim}-d index")
        v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        if entries is None:
            entries = [{"path": f"#{len(self.entries) + i}", "caption": None} for i in range(len(v))]
        if len(entries) != len(v):
            raise ValueError("one entry per vector is needed")
        if self.index_type == "flat" and self.index.ntotal + len(v) >= self.approx_threshold:
            old = self.index.reconstruct_n(0, self.index.ntotal) if self.index.ntotal else np.zeros((0, self.dim), np.float32)
            self.index = self._new_hnsw()
            if len(old):
                self.index.add(old)
        self.index.add(v)
        self.entries.extend(dict(e) for e in entries)

    def vectors(self) -> np.ndarray:
        """All stored (normalised) vectors, in id order."""
        if not len(self):
            return np.zeros((0, self.dim), np.float32)
        return self.index.reconstruct_n(0, self.index.ntotal)

    # ---- search
    def search_vectors(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(np.atleast_2d(np.asarray(queries, dtype=np.float32)))
        if q.shape[1] != self.dim:
            raise DimensionMismatchError(f"query of dim {q.shape[1]} on a {self.dim}-d index")
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        k = max(0, min(int(k), len(self)))
        if k == 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        return self.index.search(q, k)

    def _hits(self, scores: np.ndarray, ids: np.ndarray) -> list[SearchHit]:
        hits = []
        for rank, (s, i) in enumerate(zip(scores.tolist(), ids.tolist())):
            if i < 0:
                continue
            e = self.entries[i]
            hits.append(SearchHit(path=str(self.resolve(e["path"])), rel_path=e["path"], caption=e.get("caption"),
                                  score=float(s), rank=rank, id=int(i)))
        return hits

    def _need_embedder(self) -> ClipEmbedder:
        if self.embedder is None:
            raise RetrievalIndexError("this index was loaded without its embedding model")
        return self.embedder

    def search_text(self, query: str, k: int = 5) -> list[SearchHit]:
        q = self._need_embedder().embed_texts([query])
        s, i = self.search_vectors(q, k)
        return self._hits(s[0], i[0])

    def search_image(self, image: Image.Image | str | os.PathLike, k: int = 5) -> list[SearchHit]:
        if not isinstance(image, Image.Image):
            image, _ = open_image_checked(image, max_bytes=GALLERY_MAX_BYTES, max_pixels=GALLERY_MAX_PIXELS)
        q = self._need_embedder().embed_images([image])
        s, i = self.search_vectors(q, k)
        return self._hits(s[0], i[0])

    # ---- first frames
    def hit_to_first_frame(self, hit: SearchHit, buckets: Sequence[tuple[int, int]], *, query: str | None = None) -> FirstFrame:
        img, info = open_image_checked(hit.path, max_bytes=GALLERY_MAX_BYTES, max_pixels=GALLERY_MAX_PIXELS)
        return FirstFrame(
            image=fit_to_bucket(img, buckets),
            source="retrieved",
            provenance={
                "query": query,
                "gallery_path": hit.rel_path,
                "caption": hit.caption,
                "score": round(hit.score, 6),
                "rank": hit.rank,
                "model_id": self.model_id,
                "index_type": self.index_type,
                "gallery_size": len(self),
                "original_size": info["original_size"],
            },
        )

    def first_frame(self, query: str, buckets: Sequence[tuple[int, int]]) -> FirstFrame:
        """R(y): the best gallery image for ``query``, fitted to the closest bucket."""
        hits = self.search_text(query, k=1)
        if not hits:
            raise RetrievalIndexError("the gallery index is empty")
        return self.hit_to_first_frame(hits[0], buckets, query=query)

    # ---- persistence
    def _payload(self, out_dir: Path) -> dict[str, bytes]:
        import faiss

        index_bytes = faiss.serialize_index(self.index).tobytes()
        entries_bytes = json.dumps(self.entries, ensure_ascii=False, indent=0).encode("utf-8")
        root_rel = root_abs = None
        if self.root is not None:
            root_abs = self.root.as_posix()
            with contextlib.suppress(ValueError):
                root_rel = Path(os.path.relpath(self.root, out_dir.resolve())).as_posix()
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "model": self.embedder.spec.to_dict(base=out_dir) if self.embedder is not None else self.model_spec,
            "model_id": self.model_id,
            "dim": self.dim,
            "count": len(self),
            "index_type": self.index_type,
            "approx_threshold": self.approx_threshold,
            "hnsw": {"M": self.hnsw_m, "ef_construction": self.ef_construction, "ef_search": self.ef_search},
            "gallery_root": root_rel,
            "gallery_root_abs": root_abs,
            "stats": {k: self.stats[k] for k in ("added", "skipped", "duplicates")},
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "files": {
                "index.faiss": {"sha256": _sha(index_bytes), "bytes": len(index_bytes)},
                "entries.json": {"sha256": _sha(entries_bytes), "bytes": len(entries_bytes)},
            },
        }
        return {
            "index.faiss": index_bytes,
            "entries.json": entries_bytes,
            "meta.json": json.dumps(meta, indent=1, ensure_ascii=False).encode("utf-8"),  # written last
        }

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write the index directory atomically (temp dir + renames; see the module docstring)."""
        out = Path(out_dir).absolute()
        out.parent.mkdir(parents=True, exist_ok=True)
        backup = _backup_path(out)
        if not out.exists() and backup.exists():  # an earlier save crashed between its renames: repair first
            _rename(backup, out)
        payload = self._payload(out)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.mkdir(tmp)  # (not mkdtemp: that would make the index directory private, 0700)
        try:
            for name, data in payload.items():
                _write_file(tmp / name, data)
            _fsync_dir(tmp)
            if out.exists():
                if backup.exists():
                    shutil.rmtree(backup)
                _rename(out, backup)
            _rename(tmp, out)
            _fsync_dir(out.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if not out.exists() and backup.exists():
                with contextlib.suppress(OSError):
                    os.rename(backup, out)  # roll back (not through the test hook)
            raise
        shutil.rmtree(backup, ignore_errors=True)
        return out

    @classmethod
    def load(
        cls,
        index_dir: str | os.PathLike,
        model: ClipEmbedder | ClipModelSpec | str | None | bool = None,
        *,
        device: str = "cpu",
    ) -> "RetrievalIndex":
        """Load an index directory.

        ``model``: None builds the model recorded in the index; a spec/string/embedder must match the
        recorded model (else :class:`ModelMismatchError`); ``False`` loads vectors only (no text/image search).
        Damaged or missing files raise :class:`IndexCorruptError` / :class:`IndexNotFoundError`, another
        format version :class:`IndexVersionError`."""
        import faiss

        index_dir = Path(index_dir)
        from_backup = False
        if not (index_dir / "meta.json").exists() and _backup_path(index_dir.absolute()).is_dir() \
                and not index_dir.exists():
            log.warning("index %s: a save was interrupted; loading the previous index from its backup", index_dir)
            index_dir, from_backup = _backup_path(index_dir.absolute()), True
        if not index_dir.is_dir():
            raise IndexNotFoundError(f"retrieval index not found: {index_dir} (build one with `index build`)")
        meta_path = index_dir / "meta.json"
        if not meta_path.is_file():
            raise IndexNotFoundError(f"{index_dir} is not a retrieval index: meta.json is missing")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            raise IndexCorruptError(f"index {index_dir}: meta.json is damaged ({e}); rebuild the index") from None
        if meta.get("format") != FORMAT_NAME:
            raise IndexVersionError(f"{index_dir} is not a {FORMAT_NAME} directory (format={meta.get('format')!r})")
        if meta.get("format_version") != FORMAT_VERSION:
            raise IndexVersionError(
                f"index {index_dir} has format version {meta.get('format_version')!r}, this code reads version "
                f"{FORMAT_VERSION}; rebuild it with `python -m magic_demo index build`"
            )
        blobs: dict[str, bytes] = {}
        for name in ("index.faiss", "entries.json"):
            p = index_dir / name
            if not p.is_file():
                raise IndexCorruptError(f"index {index_dir}: {name} is missing; rebuild the index")
            data = p.read_bytes()
            want = meta.get("files", {}).get(name, {}).get("sha256")
            if _sha(data) != want:
                raise IndexCorruptError(
                    f"index {index_dir}: {name} is damaged (checksum mismatch, {len(data)} bytes); rebuild the index"
                )
            blobs[name] = data
        try:
            index = faiss.deserialize_index(np.frombuffer(blobs["index.faiss"], dtype=np.uint8))
            entries = json.loads(blobs["entries.json"].decode("utf-8"))
        except Exception as e:  # checksum matched but content is unusable
            raise IndexCorruptError(f"index {index_dir}: cannot read the index files ({e})") from None
        dim, count = int(meta["dim"]), int(meta["count"])
        if index.d != dim or index.ntotal != count or len(entries) != count:
            raise IndexCorruptError(
                f"index {index_dir}: inconsistent sizes (meta dim={dim} count={count}, faiss d={index.d} "
                f"ntotal={index.ntotal}, entries={len(entries)})"
            )

        recorded_id = meta.get("model_id")
        embedder: ClipEmbedder | None = None
        if model is False:
            embedder = None
        elif model is None:
            if not meta.get("model"):
                raise ModelMismatchError(f"index {index_dir} records no model; pass model=False for vectors only")
            embedder = ClipEmbedder(ClipModelSpec.from_dict(meta["model"], base=index_dir), device=device)
        else:
            spec = model.spec if isinstance(model, ClipEmbedder) else (
                ClipModelSpec.parse(model) if isinstance(model, str) else model)
            embedder = _as_embedder(model, device)
            if embedder.model_id != recorded_id:
                raise ModelMismatchError(
                    f"index {index_dir} was built with model {recorded_id!r} ({dim}-d), not with "
                    f"{embedder.model_id!r} ({embedder.dim}-d); rebuild it with this model or load it with "
                    "the recorded one"
                )
        if embedder is not None:
            if embedder.model_id != recorded_id:
                raise ModelMismatchError(
                    f"index {index_dir} was built with model {recorded_id!r}, but the recorded spec now builds "
                    f"{embedder.model_id!r} (config or checkpoint changed); rebuild the index"
                )
            if embedder.dim != dim:
                raise DimensionMismatchError(
                    f"index {index_dir} holds {dim}-d vectors but model {embedder.model_id!r} gives "
                    f"{embedder.dim}-d embeddings"
                )
        root = None
        if meta.get("gallery_root") is not None and (index_dir / meta["gallery_root"]).exists():
            root = index_dir / meta["gallery_root"]
        elif meta.get("gallery_root_abs"):
            root = meta["gallery_root_abs"]
        if from_backup and meta.get("gallery_root") is not None:  # the backup sits beside the index dir
            root = index_dir.parent / meta["gallery_root"]
        h = meta.get("hnsw", {})
        obj = cls(embedder, dim=dim, root=root, approx_threshold=meta.get("approx_threshold", DEFAULT_APPROX_THRESHOLD),
                  hnsw_m=h.get("M", 32), ef_construction=h.get("ef_construction", 80), ef_search=h.get("ef_search", 128),
                  model_spec=meta.get("model"), model_id=recorded_id)
        obj.index = index
        if obj.index_type == "hnsw":
            obj.index.hnsw.efSearch = obj.ef_search
        obj.entries = entries
        obj.stats.update({k: int(v) for k, v in meta.get("stats", {}).items() if k in ("added", "skipped", "duplicates")})
        obj.loaded_from_backup = from_backup
        return obj


# --------------------------------------------------------------------------------------------- placeholder gallery
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


# --------------------------------------------------------------------------------------------- CLI
def _spec_from_args(args: argparse.Namespace) -> ClipModelSpec:
    return ClipModelSpec.parse(args.model or "", config_file=args.model_config, seed=args.seed)


def _cmd_build(args: argparse.Namespace) -> int:
    idx = RetrievalIndex.build(args.images, _spec_from_args(args), captions=args.captions, batch_size=args.batch_size,
                               progress=not args.no_progress, device=args.device, approx_threshold=args.approx_threshold)
    out = idx.save(args.out)
    summary = {"index": str(out), "count": len(idx), "skipped": idx.stats["skipped"], "model_id": idx.model_id,
               "dim": idx.dim, "index_type": idx.index_type}
    print(json.dumps(summary) if args.json else
          f"indexed {len(idx)} images ({idx.stats['skipped']} unreadable skipped) with {idx.model_id} "
          f"[{idx.index_type}, {idx.dim}-d] -> {out}")
    return 0


def _cmd_add(args: argparse.Namespace) -> int:
    idx = RetrievalIndex.load(args.index, device=args.device)
    stats = idx.add(args.paths, captions=args.captions, batch_size=args.batch_size, progress=not args.no_progress)
    idx.save(args.index)
    summary = {"index": str(args.index), "count": len(idx), **{k: stats[k] for k in ("added", "skipped", "duplicates")}}
    print(json.dumps(summary) if args.json else
          f"added {stats['added']} images ({stats['skipped']} unreadable, {stats['duplicates']} already indexed); "
          f"{len(idx)} in total")
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    if (args.query is None) == (args.image is None):
        print("index search: give exactly one of --query or --image", file=sys.stderr)
        return 2
    idx = RetrievalIndex.load(args.index, device=args.device)
    hits = idx.search_text(args.query, args.k) if args.query is not None else idx.search_image(args.image, args.k)
    if args.json:
        print(json.dumps([h.to_dict() for h in hits], ensure_ascii=False))
    else:
        for h in hits:
            print(f"{h.rank + 1:>3}  {h.score:+.4f}  {h.rel_path}  {h.caption or ''}")
    return 0


def _cmd_make_gallery(args: argparse.Namespace) -> int:
    if args.kind == "world":
        paths = make_world_gallery(args.out, n=args.n or 576, size=args.size, seed=args.gallery_seed)
        print(f"wrote {len(paths)} world first frames + captions.json + specs.json to {args.out}")
    else:
        paths = make_placeholder_gallery(args.out, n=args.n or 40, size=args.size)
        print(f"wrote {len(paths)} placeholder images + captions.json to {args.out}")
    if args.model is None:
        args.model = MINI_CLIP_NAME if args.kind == "world" else DEFAULT_MODEL
    if args.index_out:
        idx = RetrievalIndex.build(args.out, _spec_from_args(args), progress=not args.no_progress)
        idx.save(args.index_out)
        print(f"indexed {len(idx)} images with {idx.model_id} -> {args.index_out}")
    return 0


def _run_index_command(args: argparse.Namespace) -> int:
    try:
        return args.index_func(args)
    except (RetrievalIndexError, FileNotFoundError, FirstFrameError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def add_index_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``index build|add|search|make-gallery`` on an argparse subparsers object.

    Each leaf parser sets ``func`` (and ``handler``) to a callable ``(args) -> int`` exit code."""
    p = subparsers.add_parser("index", help="first-frame retrieval gallery index (open_clip + faiss)",
                              description="Build, extend and search the retrieval index of first-frame images.")
    sub = p.add_subparsers(dest="index_command", metavar="{build,add,search,make-gallery}")
    sub.required = True

    def common(sp: argparse.ArgumentParser, model: bool = False) -> None:
        sp.add_argument("--device", default="cpu")
        sp.add_argument("--json", action="store_true", help="machine-readable output")
        sp.add_argument("--no-progress", action="store_true")
        if model:
            sp.add_argument("--model", default=DEFAULT_MODEL,
                            help="open_clip ARCH[@PRETRAINED] (tag or checkpoint file), or local-dir:PATH "
                                 f"(default: {DEFAULT_MODEL}, a tiny random placeholder)")
            sp.add_argument("--model-config", default=None, help="custom open_clip config JSON to register")
            sp.add_argument("--seed", type=int, default=0, help="init seed for random-weight models")

    b = sub.add_parser("build", help="embed a folder of images into a new index")
    b.add_argument("--images", required=True, help="gallery folder (searched recursively)")
    b.add_argument("--out", required=True, help="index directory to write")
    b.add_argument("--captions", default=None, help="captions sidecar (json/jsonl/tsv); default: auto-detect")
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--approx-threshold", type=int, default=DEFAULT_APPROX_THRESHOLD,
                   help="use HNSW instead of exact search from this many images")
    common(b, model=True)
    b.set_defaults(index_func=_cmd_build)

    a = sub.add_parser("add", help="add images (files or folders) to an existing index")
    a.add_argument("--index", required=True)
    a.add_argument("paths", nargs="+")
    a.add_argument("--captions", default=None)
    a.add_argument("--batch-size", type=int, default=32)
    common(a)
    a.set_defaults(index_func=_cmd_add)

    s = sub.add_parser("search", help="search an index by text or by image")
    s.add_argument("--index", required=True)
    s.add_argument("--query", default=None, help="text query")
    s.add_argument("--image", default=None, help="image query (path)")
    s.add_argument("-k", type=int, default=5)
    common(s)
    s.set_defaults(index_func=_cmd_search)

    g = sub.add_parser("make-gallery", help="(re)draw the gallery: world first frames (default) or placeholder")
    g.add_argument("--out", default="assets/gallery")
    g.add_argument("--index-out", default=None, help="also build its index here (e.g. assets/gallery_index)")
    g.add_argument("--kind", choices=("world", "placeholder"), default="world",
                   help="world: first frames of the miniature world (576 by default); placeholder: 40 old shapes")
    g.add_argument("--n", type=int, default=None)
    g.add_argument("--size", type=int, default=64)
    g.add_argument("--gallery-seed", type=int, default=0, help="seed of the world gallery")
    common(g, model=True)
    g.set_defaults(model=None)  # world: magic-mini-clip (the trained CLIP); placeholder: the tiny random one
    g.set_defaults(index_func=_cmd_make_gallery)

    for leaf in (b, a, s, g):
        leaf.set_defaults(func=_run_index_command, handler=_run_index_command)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m magic_demo.retrieval")
    add_index_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
