"""RetrievalIndex: a gallery of first frames searchable by text or image.

It embeds a folder of images with an open_clip model (L2-normalised embeddings,
``clip_models.py``) and searches them with faiss by inner product: exact ``IndexFlatIP`` below
``approx_threshold`` vectors, an approximate ``IndexHNSWFlat`` (inner product) at or above it (recall measured in
tests and the benchmark). On disk: ``store.py``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from magic_demo.first_frame import FirstFrame, FirstFrameError, fit_to_bucket, open_image_checked
from magic_demo.retrieval.clip_models import ClipEmbedder, ClipModelSpec, _as_embedder
from magic_demo.retrieval.errors import DimensionMismatchError, RetrievalIndexError
from magic_demo.retrieval.gallery import (GALLERY_MAX_BYTES, GALLERY_MAX_PIXELS, _find_sidecar, iter_images,
                                          load_captions)
from magic_demo.retrieval.store import DEFAULT_APPROX_THRESHOLD, load_index, save_index

log = logging.getLogger(__name__)


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

    # ---- persistence (store.py)
    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write the index directory atomically (:func:`magic_demo.retrieval.store.save_index`)."""
        return save_index(self, out_dir)

    @classmethod
    def load(cls, index_dir: str | os.PathLike, model: ClipEmbedder | ClipModelSpec | str | None | bool = None, *,
             device: str = "cpu") -> "RetrievalIndex":
        """Load an index directory (:func:`magic_demo.retrieval.store.load_index`): ``model`` None builds the
        recorded model, a spec/string/embedder must match it, ``False`` loads vectors only."""
        return load_index(cls, index_dir, model, device=device)
