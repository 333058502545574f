"""``python -m magic_demo index build|add|search|make-gallery`` (also ``python -m magic_demo.retrieval``)::

    index build  --images DIR --out INDEX_DIR [--model ARCH[@PRETRAINED]] [--model-config CFG.json]
    index add    --index INDEX_DIR PATH [PATH ...]
    index search --index INDEX_DIR (--query TEXT | --image PATH) [-k 5] [--json]
    index make-gallery --out DIR [--index-out INDEX_DIR] [--kind world|placeholder] [--model magic-mini-clip]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from magic_demo.first_frame import FirstFrameError
from magic_demo.retrieval.clip_models import DEFAULT_MODEL, MINI_CLIP_NAME, ClipModelSpec
from magic_demo.retrieval.errors import RetrievalIndexError
from magic_demo.retrieval.gallery import make_placeholder_gallery, make_world_gallery
from magic_demo.retrieval.index import RetrievalIndex
from magic_demo.retrieval.store import DEFAULT_APPROX_THRESHOLD


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

