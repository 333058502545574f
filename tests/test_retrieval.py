"""Retrieval index: build/save/load, exact vs numpy, HNSW recall, add, errors, crash-safe save, CLI."""

import os

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from magic_demo import retrieval as R
from magic_demo.retrieval import store
from magic_demo.retrieval import (
    ClipEmbedder,
    ClipModelSpec,
    DimensionMismatchError,
    IndexCorruptError,
    IndexNotFoundError,
    IndexVersionError,
    ModelMismatchError,
    RetrievalIndex,
    make_placeholder_gallery,
)

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def embedder():
    return ClipEmbedder(ClipModelSpec(R.TINY_CLIP_NAME, seed=0))


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    root = tmp_path_factory.mktemp("gallery")
    make_placeholder_gallery(root, n=12, size=48)
    (root / "nested").mkdir()
    Image.new("RGB", (40, 40), (250, 250, 0)).save(root / "nested" / "yellow.png")
    (root / "nested" / "yellow.txt").write_text("a plain yellow square\n")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    (root / "notes.md").write_text("not an image, ignored")
    return root


@pytest.fixture(scope="module")
def built(gallery, embedder):
    return RetrievalIndex.build(gallery, embedder, progress=False)


def _gallery_images(idx):
    return [Image.open(idx.resolve(e["path"])).convert("RGB") for e in idx.entries]


def test_build_counts_skips_and_captions(built):
    assert len(built) == 13 and built.index_type == "flat" and built.dim == 32
    assert built.stats["skipped"] == 1 and built.stats["skipped_files"][0]["path"] == "broken.png"
    caps = {e["path"]: e["caption"] for e in built.entries}
    assert caps["nested/yellow.png"] == "a plain yellow square"  # per-image .txt sidecar
    assert caps["000_red_circle.png"] == "a red circle on a black background"  # captions.json


def test_save_load_round_trip(built, embedder, tmp_path):
    out = built.save(tmp_path / "idx")
    assert sorted(p.name for p in out.iterdir()) == ["entries.json", "index.faiss", "meta.json"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["model_id"] == embedder.model_id and meta["dim"] == 32 and meta["format_version"] == R.FORMAT_VERSION
    assert meta["model"]["arch"] == R.TINY_CLIP_NAME
    loaded = RetrievalIndex.load(out)  # builds the recorded model itself
    assert loaded.entries == built.entries and loaded.model_id == built.model_id
    assert np.array_equal(loaded.vectors(), built.vectors())
    assert Path(loaded.resolve(loaded.entries[0]["path"])).is_file()
    q = "a green square on a grey background"
    assert [h.id for h in loaded.search_text(q, 5)] == [h.id for h in built.search_text(q, 5)]
    # the gallery root is stored relative to the index dir: moving both together keeps paths valid
    shutil.copytree(built.root, tmp_path / "a" / "gallery", ignore=shutil.ignore_patterns("broken.png"))
    RetrievalIndex.build(tmp_path / "a" / "gallery", embedder, progress=False).save(tmp_path / "a" / "index")
    os.rename(tmp_path / "a", tmp_path / "b")
    moved = RetrievalIndex.load(tmp_path / "b" / "index", embedder)
    assert moved.root == (tmp_path / "b" / "gallery").resolve()
    assert moved.search_image(Image.open(tmp_path / "b" / "gallery" / "nested" / "yellow.png"), 1)[0].rel_path \
        == "nested/yellow.png"


def test_image_query_returns_itself_first(built):
    for e, img in zip(built.entries, _gallery_images(built)):
        hits = built.search_image(img, k=3)
        assert hits[0].rel_path == e["path"] and hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert hits[0].score >= hits[1].score
    hit = built.search_image(built.resolve(built.entries[4]["path"]), k=1)[0]  # by path too
    assert hit.id == 4 and hit.caption == built.entries[4]["caption"]


def test_faiss_equals_bruteforce_numpy(built, embedder):
    emb = embedder.embed_images(_gallery_images(built))
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    queries = ["a red circle", "a blue ring on a navy background", "yellow", "a cross"]
    for q in queries:
        sims = emb @ embedder.embed_texts([q])[0]
        want = np.argsort(-sims, kind="stable")[:5]
        hits = built.search_text(q, 5)
        assert np.allclose([h.score for h in hits], sims[want], atol=1e-5)
        assert [h.id for h in hits] == want.tolist() or np.allclose(sims[[h.id for h in hits]], sims[want], atol=1e-6)
    assert len(built.search_text("anything", k=100)) == len(built)  # k capped at the gallery size


def _clustered(rng, n, d, centres):
    c = centres[rng.integers(0, len(centres), n)]
    return (c + 0.35 * rng.standard_normal((n, d))).astype(np.float32)


def test_approximate_recall_at_10_vs_exact():
    rng = np.random.default_rng(0)
    d = 64
    centres = rng.standard_normal((50, d)).astype(np.float32)
    base = _clustered(rng, 6000, d, centres)
    queries = _clustered(rng, 200, d, centres)
    idx = RetrievalIndex(None, dim=d, approx_threshold=1000)
    idx.add_vectors(base[:500])
    assert idx.index_type == "flat"
    idx.add_vectors(base[500:])  # crosses the threshold: switches to HNSW, keeps the first 500
    assert idx.index_type == "hnsw" and len(idx) == 6000
    nb = base / np.linalg.norm(base, axis=1, keepdims=True)
    nq = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    exact = np.argsort(-(nq @ nb.T), axis=1)[:, :10]
    _, approx = idx.search_vectors(queries, 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx.tolist(), exact.tolist())])
    assert recall >= 0.95, recall
    with pytest.raises(DimensionMismatchError):
        idx.add_vectors(np.zeros((2, d + 1), np.float32))


def test_hnsw_index_persists(tmp_path):
    rng = np.random.default_rng(1)
    idx = RetrievalIndex(None, dim=16, approx_threshold=100, ef_search=77)
    idx.add_vectors(rng.standard_normal((300, 16)))
    idx.save(tmp_path / "h")
    back = RetrievalIndex.load(tmp_path / "h", model=False)
    assert back.index_type == "hnsw" and len(back) == 300 and back.index.hnsw.efSearch == 77
    q = rng.standard_normal((5, 16))
    assert np.array_equal(back.search_vectors(q, 5)[1], idx.search_vectors(q, 5)[1])


def test_incremental_add(gallery, embedder, tmp_path):
    idx = RetrievalIndex.build(gallery / "nested", embedder, progress=False)
    assert len(idx) == 1
    idx.save(tmp_path / "inc")
    idx = RetrievalIndex.load(tmp_path / "inc", embedder)
    new = sorted(gallery.glob("00*.png"))[:5]
    stats = idx.add(new + [gallery / "nested" / "yellow.png", gallery / "broken.png"], progress=False)
    assert stats["added"] == 5 and stats["duplicates"] == 1 and stats["skipped"] == 1
    idx.save(tmp_path / "inc")
    again = RetrievalIndex.load(tmp_path / "inc", embedder)
    assert len(again) == 6
    hit = again.search_image(Image.open(new[2]).convert("RGB"), k=1)[0]
    assert Path(hit.path).resolve() == new[2].resolve()
    assert hit.caption == json.loads((gallery / "captions.json").read_text())[new[2].name]


def test_model_and_dim_mismatch(built, tmp_path):
    out = built.save(tmp_path / "m")
    with pytest.raises(ModelMismatchError, match=r"built with model .*magic-tiny-clip@random\(seed=0\).* not with .*seed=1"):
        RetrievalIndex.load(out, ClipModelSpec(R.TINY_CLIP_NAME, seed=1))
    cfg16 = json.loads(json.dumps(R.TINY_CLIP_CONFIG))
    cfg16["embed_dim"] = 16
    with pytest.raises(ModelMismatchError, match=r"\(32-d\), not with .*\(16-d\)"):
        RetrievalIndex.load(out, ClipModelSpec("test-tiny-clip-16", config=cfg16))
    # the recorded model spec changed under the index (e.g. a retrained config): refused, not silently wrong
    meta = json.loads((out / "meta.json").read_text())
    meta["model"]["config"] = cfg16
    meta["model"]["arch"] = "test-tiny-clip-16b"
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ModelMismatchError, match="rebuild"):
        RetrievalIndex.load(out)


def test_damaged_missing_and_version_errors(built, tmp_path):
    src = built.save(tmp_path / "good")

    def fresh(name):
        d = tmp_path / name
        shutil.copytree(src, d)
        return d

    d = fresh("flip")
    data = bytearray((d / "index.faiss").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / "index.faiss").write_bytes(bytes(data))
    with pytest.raises(IndexCorruptError, match="index.faiss is damaged"):
        RetrievalIndex.load(d, model=False)
    d = fresh("trunc")
    (d / "entries.json").write_bytes((d / "entries.json").read_bytes()[:10])
    with pytest.raises(IndexCorruptError, match="entries.json is damaged"):
        RetrievalIndex.load(d, model=False)
    d = fresh("meta")
    (d / "meta.json").write_text('{"format": "magic-demo-retr')
    with pytest.raises(IndexCorruptError, match="meta.json is damaged"):
        RetrievalIndex.load(d, model=False)
    d = fresh("gone")
    (d / "index.faiss").unlink()
    with pytest.raises(IndexCorruptError, match="index.faiss is missing"):
        RetrievalIndex.load(d, model=False)
    d = fresh("nometa")
    (d / "meta.json").unlink()
    with pytest.raises(IndexNotFoundError, match="meta.json is missing"):
        RetrievalIndex.load(d, model=False)
    with pytest.raises(IndexNotFoundError, match="not found"):
        RetrievalIndex.load(tmp_path / "nowhere", model=False)
    d = fresh("version")
    meta = json.loads((d / "meta.json").read_text())
    meta["format_version"] = 99
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(IndexVersionError, match="format version 99, this code reads version 1"):
        RetrievalIndex.load(d, model=False)
    assert issubclass(IndexCorruptError, ValueError)


def test_crash_during_save_leaves_previous_index_loadable(built, embedder, gallery, tmp_path, monkeypatch):
    out = tmp_path / "crash"
    small = RetrievalIndex.build(gallery / "nested", embedder, progress=False)
    small.save(out)
    real_rename = os.rename
    calls = []

    def crashing_rename(a, b):
        calls.append((a, b))
        if len(calls) == 2:  # old -> backup worked; the temp -> final rename "crashes"
            raise OSError("simulated crash")
        real_rename(a, b)

    monkeypatch.setattr(store, "_rename", crashing_rename)
    with pytest.raises(OSError, match="simulated crash"):
        built.save(out)
    monkeypatch.setattr(store, "_rename", real_rename)
    assert len(RetrievalIndex.load(out, embedder)) == 1  # the previous index
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dir left behind

    # crash while writing the files: the old index is untouched
    def broken_write(path, data):
        raise OSError("disk full")

    monkeypatch.setattr(store, "_write_file", broken_write)
    with pytest.raises(OSError, match="disk full"):
        built.save(out)
    monkeypatch.undo()
    assert len(RetrievalIndex.load(out, embedder)) == 1

    # hard kill between the two renames (no cleanup ran): the index dir is gone, only the backup and a
    # half-written temp dir remain on disk -> load reads the backup; the next save repairs the layout
    real_rename(out, store._backup_path(out.absolute()))
    half = tmp_path / ".crash.tmp-123-abc"
    half.mkdir()
    (half / "index.faiss").write_bytes(b"partial")
    rec = RetrievalIndex.load(out, embedder)
    assert len(rec) == 1 and rec.loaded_from_backup
    assert rec.search_image(Image.open(gallery / "nested" / "yellow.png"), 1)[0].rel_path == "yellow.png"
    built.save(out)
    assert len(RetrievalIndex.load(out, embedder)) == len(built)
    assert not store._backup_path(out.absolute()).exists()


def test_hit_to_first_frame(built):
    f = built.first_frame("a purple triangle", [(96, 64), (64, 64)])
    assert f.source == "retrieved" and f.image.size == (64, 64)  # square gallery -> square bucket
    assert f.provenance["model_id"] == built.model_id and "score" in f.provenance
    assert f.provenance["gallery_path"] in {e["path"] for e in built.entries}
    json.dumps(f.provenance)


def test_model_spec_parse_and_ids(tmp_path):
    s = ClipModelSpec.parse("ViT-B-32@laion2b_s34b_b79k")
    assert (s.arch, s.pretrained) == ("ViT-B-32", "laion2b_s34b_b79k")
    assert s.model_id.startswith("open_clip:ViT-B-32@laion2b_s34b_b79k#cfg:")
    cfg = tmp_path / "my-mini-clip.json"
    cfg.write_text(json.dumps(R.TINY_CLIP_CONFIG))
    c = ClipModelSpec.parse("", config_file=cfg, seed=3)
    assert c.arch == "my-mini-clip" and c.config == R.TINY_CLIP_CONFIG
    assert c.model_id != ClipModelSpec(R.TINY_CLIP_NAME, seed=3).model_id.replace(R.TINY_CLIP_NAME, "x")
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"weights-v1")
    a = ClipModelSpec("my-mini-clip", pretrained=str(ckpt), config=R.TINY_CLIP_CONFIG).model_id
    ckpt.write_bytes(b"weights-v2")
    assert a != ClipModelSpec("my-mini-clip", pretrained=str(ckpt), config=R.TINY_CLIP_CONFIG).model_id


def test_cli_build_add_search(gallery, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    R.add_index_cli(parser.add_subparsers(dest="command", required=True))

    def run(*argv):
        args = parser.parse_args(list(argv))
        return args.func(args)

    out = tmp_path / "cli_idx"
    assert run("index", "build", "--images", str(gallery / "nested"), "--out", str(out), "--json", "--no-progress") == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["count"] == 1
    assert run("index", "add", "--index", str(out), str(gallery / "000_red_circle.png"), "--json", "--no-progress") == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["count"] == 2
    assert run("index", "search", "--index", str(out), "--query", "a red circle", "-k", "5", "--json") == 0
    hits = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(hits) == 2 and {"path", "caption", "score"} <= set(hits[0])
    assert run("index", "search", "--index", str(tmp_path / "none"), "--query", "x") == 1
    assert "not found" in capsys.readouterr().err


def test_shipped_gallery_index_is_consistent():
    gdir, idir = REPO / "assets" / "gallery", REPO / "assets" / "gallery_index"
    idx = RetrievalIndex.load(idir)  # offline, no arguments: builds the model it records (the trained mini CLIP)
    assert idx.model_id == ClipModelSpec.parse(R.MINI_CLIP_NAME).model_id
    assert len(idx) >= 500 and idx.root == gdir.resolve()
    assert sorted(e["path"] for e in idx.entries) == sorted(p.name for p in R.iter_images(gdir))
    assert all(Path(idx.resolve(e["path"])).is_file() and e["caption"] for e in idx.entries)
    fresh = idx.embedder.embed_images(_gallery_images(idx))
    assert np.allclose(fresh, idx.vectors(), atol=1e-4)  # the prebuilt index matches its recorded model
