"""Retrieved first frames: R(y) = argmax over a gallery of cosine(phi(text), psi(image)).

One idea per module:

- ``clip_models``  which open_clip model embeds the gallery (:class:`ClipModelSpec`) and the embedder built from it
  (:class:`ClipEmbedder`); ``magic-tiny-clip`` (random, for tests) and ``magic-mini-clip`` (trained, shipped).
- ``index``        :class:`RetrievalIndex`: embed a gallery folder, search it by text or image with faiss, turn a
  hit into a :class:`~magic_demo.first_frame.FirstFrame`.
- ``store``        the index on disk: atomic saves, checked loads, the recorded model enforced.
- ``gallery``      gallery folders (images, caption sidecars) and the shipped world gallery (``assets/gallery``,
  indexed in ``assets/gallery_index``).
- ``errors``       the error classes, each message naming what is wrong and what to do.
- ``cli``          ``python -m magic_demo index build|add|search|make-gallery``.
"""

from magic_demo.retrieval.cli import add_index_cli, main
from magic_demo.retrieval.clip_models import (CLIP_CONFIG_FILE, CLIP_WEIGHTS_FILE, DEFAULT_MODEL, MINI_CLIP_DIR,
                                              MINI_CLIP_NAME, TINY_CLIP_CONFIG, TINY_CLIP_NAME, ClipEmbedder,
                                              ClipModelSpec, load_clip_state_dict, register_clip_config,
                                              save_clip_safetensors)
from magic_demo.retrieval.errors import (DimensionMismatchError, IndexCorruptError, IndexNotFoundError,
                                         IndexVersionError, ModelMismatchError, RetrievalIndexError)
from magic_demo.retrieval.gallery import (CAPTION_SIDECARS, GALLERY_MAX_BYTES, GALLERY_MAX_PIXELS, IMAGE_EXTENSIONS,
                                          iter_images, load_captions, make_placeholder_gallery, make_world_gallery)
from magic_demo.retrieval.index import RetrievalIndex, SearchHit
from magic_demo.retrieval.store import DEFAULT_APPROX_THRESHOLD, FORMAT_NAME, FORMAT_VERSION, load_index, save_index

__all__ = [
    "CAPTION_SIDECARS", "CLIP_CONFIG_FILE", "CLIP_WEIGHTS_FILE", "DEFAULT_APPROX_THRESHOLD", "DEFAULT_MODEL",
    "FORMAT_NAME", "FORMAT_VERSION", "GALLERY_MAX_BYTES", "GALLERY_MAX_PIXELS", "IMAGE_EXTENSIONS", "MINI_CLIP_DIR",
    "MINI_CLIP_NAME", "TINY_CLIP_CONFIG", "TINY_CLIP_NAME", "ClipEmbedder", "ClipModelSpec", "DimensionMismatchError",
    "IndexCorruptError", "IndexNotFoundError", "IndexVersionError", "ModelMismatchError", "RetrievalIndex",
    "RetrievalIndexError", "SearchHit", "add_index_cli", "iter_images", "load_captions", "load_clip_state_dict",
    "load_index", "main", "make_placeholder_gallery", "make_world_gallery", "register_clip_config",
    "save_clip_safetensors", "save_index",
]
