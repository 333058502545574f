"""The CLIP models that embed a retrieval gallery: which open_clip model (:class:`ClipModelSpec`), built and run as
an embedder of images and texts (:class:`ClipEmbedder`, L2-normalised float32 vectors).

``magic-tiny-clip`` (a tiny random model) is registered here for tests and the placeholder gallery;
``magic-mini-clip`` is the trained miniature CLIP shipped in ``assets/mini/clip`` (``magic_demo.train.clip``).
Local ``.safetensors`` checkpoints are read without pickle, with compact embedding tables
(:func:`save_clip_safetensors`); other checkpoint files go through open_clip with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

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
MINI_CLIP_DIR = Path(__file__).resolve().parents[2] / "assets" / "mini" / "clip"
CLIP_CONFIG_FILE = "open_clip_config.json"
CLIP_WEIGHTS_FILE = "open_clip_model.safetensors"
_COMPACT_IDS, _COMPACT_ROWS = ".compact_ids", ".compact_rows"


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
            return get_model_config(self.arch)  # None for an architecture open_clip does not know
        except (OSError, ValueError):  # a local-dir: model whose folder or config is gone or broken
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
