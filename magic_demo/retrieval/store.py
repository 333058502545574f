"""A retrieval index on disk, written atomically and read back with every file checked.

An index is a directory::

    meta.json      format name + version, model spec + id, dim, count, index type, gallery root, checksums
    entries.json   [{"path": <relative to the gallery root, or absolute>, "caption": str|null}, ...]
    index.faiss    faiss.serialize_index bytes

``save_index`` writes a temporary sibling directory, fsyncs it and swaps it in with renames (old -> ``.NAME.bak``,
temp -> NAME, then the backup is deleted). If a crash lands between the two renames, ``load_index`` reads the
backup (the previous index) and the next save repairs the layout, so a crash never leaves a broken index.
A local CLIP checkpoint is recorded both by absolute path and relative to the index folder, so an index and its
model can move together; loading with another model than the recorded one is refused.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from magic_demo.retrieval.clip_models import ClipEmbedder, ClipModelSpec, _as_embedder, _sha
from magic_demo.retrieval.errors import (DimensionMismatchError, IndexCorruptError, IndexNotFoundError,
                                         IndexVersionError, ModelMismatchError)

if TYPE_CHECKING:
    from magic_demo.retrieval.index import RetrievalIndex

log = logging.getLogger(__name__)

FORMAT_NAME = "magic-demo-retrieval-index"
FORMAT_VERSION = 1
DEFAULT_APPROX_THRESHOLD = 20_000

# Indirection so tests can simulate a crash in the middle of ``save``.
_rename = os.rename


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


def _payload(idx: "RetrievalIndex", out_dir: Path) -> dict[str, bytes]:
    import faiss

    index_bytes = faiss.serialize_index(idx.index).tobytes()
    entries_bytes = json.dumps(idx.entries, ensure_ascii=False, indent=0).encode("utf-8")
    root_rel = root_abs = None
    if idx.root is not None:
        root_abs = idx.root.as_posix()
        with contextlib.suppress(ValueError):
            root_rel = Path(os.path.relpath(idx.root, out_dir.resolve())).as_posix()
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model": idx.embedder.spec.to_dict(base=out_dir) if idx.embedder is not None else idx.model_spec,
        "model_id": idx.model_id,
        "dim": idx.dim,
        "count": len(idx),
        "index_type": idx.index_type,
        "approx_threshold": idx.approx_threshold,
        "hnsw": {"M": idx.hnsw_m, "ef_construction": idx.ef_construction, "ef_search": idx.ef_search},
        "gallery_root": root_rel,
        "gallery_root_abs": root_abs,
        "stats": {k: idx.stats[k] for k in ("added", "skipped", "duplicates")},
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


def save_index(idx: "RetrievalIndex", out_dir: str | os.PathLike) -> Path:
    """Write the index directory atomically (temp dir + renames; see the module docstring)."""
    out = Path(out_dir).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    backup = _backup_path(out)
    if not out.exists() and backup.exists():  # an earlier save crashed between its renames: repair first
        _rename(backup, out)
    payload = _payload(idx, out)
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


def load_index(
    cls: type,
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
