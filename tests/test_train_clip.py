"""Retrieval CLIP training: steps learn, checkpoint/resume continues exactly, export round-trips, gallery, shipped model."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from magic_demo import world
from magic_demo.retrieval import (CLIP_WEIGHTS_FILE, MINI_CLIP_NAME, ClipEmbedder, ClipModelSpec, RetrievalIndex,
                                  load_clip_state_dict, make_world_gallery)
from magic_demo.train import clip as C

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
KW = dict(config="test", steps=40, batch=24, lr=3e-3, warmup=2, eval_every=0, progress=False, log_every=1)


def _batch_loss(model, tok, mean, std, step=0):
    images, caps, _ = C.make_batch(step, 0, 24, 32)
    with torch.no_grad():
        img = model.encode_image(C.images_to_tensor(images, mean, std), normalize=True)
        txt = model.encode_text(tok(caps), normalize=True)
        return float(C.clip_loss(img, txt, model.logit_scale))


def _load_run(out):
    model, pre, tok, _ = C.build_model("test")
    model.load_state_dict(torch.load(Path(out) / "ckpt_latest.pt", weights_only=True)["model"])
    return model.eval(), pre, tok


def test_batches_are_deterministic_and_free_of_false_negatives():
    a, caps, specs = C.make_batch(5, 0, 96, 32)
    b, caps2, _ = C.make_batch(5, 0, 96, 32)
    assert caps == caps2 and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert len({(s.colour, s.shape, s.background) for s in specs}) == 96  # each visual class once
    assert all(world.parse_caption(c) for c in caps) and a[0].shape == (32, 32, 3)
    assert C.make_batch(6, 0, 96, 32)[1] != caps
    with pytest.raises(ValueError):
        C.make_batch(0, 0, 97, 32)


def test_train_resume_export_round_trip(tmp_path):
    fresh, pre, tok, _ = C.build_model("test")
    mean, std = C._normalize_params(pre)
    before = _batch_loss(fresh.eval(), tok, mean, std)

    # 5 steps, then resume for 4 more: the step count continues, the result equals 9 uninterrupted steps
    s1 = C.train(tmp_path / "run", max_new_steps=5, **KW)
    assert s1["step"] == 5
    s2 = C.train(tmp_path / "run", max_new_steps=4, export_dir=tmp_path / "export", **KW)
    assert s2["step"] == 9
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 10))
    C.train(tmp_path / "straight", max_new_steps=9, **KW)
    resumed, _, _ = _load_run(tmp_path / "run")
    straight, _, _ = _load_run(tmp_path / "straight")
    for (k, v), w in zip(resumed.state_dict().items(), straight.state_dict().values()):
        assert torch.allclose(v, w, atol=1e-6), k

    # the weights moved and the loss on the first batch went down
    assert not torch.equal(resumed.visual.conv1.weight, fresh.visual.conv1.weight)
    assert _batch_loss(resumed, tok, mean, std) < before

    # export: compact safetensors (no 49408-row table on disk), loads through ClipModelSpec/ClipEmbedder
    wfile = tmp_path / "export" / CLIP_WEIGHTS_FILE
    assert wfile.stat().st_size < 400_000
    sd = load_clip_state_dict(wfile)
    assert sd["token_embedding.weight"].shape == (C.VOCAB_SIZE, 32)
    assert torch.equal(sd["token_embedding.weight"], resumed.token_embedding.weight)
    for spec in (ClipModelSpec.mini(tmp_path / "export"),
                 ClipModelSpec.parse(f"{MINI_CLIP_NAME}@{wfile}")):  # config found beside the weights
        emb = ClipEmbedder(spec)
        specs = [world.sample_spec(i) for i in range(6)]
        frames = [world.render_first_frame(s, size=32) for s in specs]
        caps = [world.caption(s) for s in specs] + ["an unknown word query"]
        with torch.no_grad():
            want_i = resumed.encode_image(C.images_to_tensor(frames, mean, std), normalize=True).numpy()
            want_t = resumed.encode_text(tok(caps), normalize=True).numpy()
        assert np.allclose(emb.embed_images([Image.fromarray(f) for f in frames]), want_i, atol=1e-5)
        assert np.allclose(emb.embed_texts(caps), want_t, atol=1e-5)
    assert spec.model_id == ClipModelSpec.mini(tmp_path / "export").model_id


def test_world_gallery_index_moves_with_its_model(tmp_path):
    C.train(tmp_path / "run", max_new_steps=2, export_dir=tmp_path / "a" / "clip", **KW)
    paths = make_world_gallery(tmp_path / "a" / "gallery", n=30, size=32, seed=3)
    assert len(paths) == 30 and [p.name for p in paths] == [p.name for p in make_world_gallery(
        tmp_path / "again", n=30, size=32, seed=3)]
    assert all(np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(tmp_path / "again" / p.name)))
               for p in paths)
    caps = json.loads((tmp_path / "a" / "gallery" / "captions.json").read_text())
    specs = json.loads((tmp_path / "a" / "gallery" / "specs.json").read_text())
    assert set(caps) == set(specs) == {p.name for p in paths}
    assert all(world.caption(world.ClipSpec(**specs[k])) == v for k, v in caps.items())

    idx = RetrievalIndex.build(tmp_path / "a" / "gallery", ClipModelSpec.mini(tmp_path / "a" / "clip"), progress=False)
    idx.save(tmp_path / "a" / "index")
    shutil.move(tmp_path / "a", tmp_path / "b")  # a fresh clone elsewhere: absolute paths are gone
    moved = RetrievalIndex.load(tmp_path / "b" / "index")
    assert moved.model_id == idx.model_id and np.array_equal(moved.vectors(), idx.vectors())
    assert Path(moved.embedder.spec.pretrained).is_relative_to((tmp_path / "b").resolve())
    res = C.evaluate_retrieval(moved, n=20, seed=1)
    assert res["n"] == 20 and res["gallery"] == 30
    assert all(0.0 <= res[k] <= 1.0 for k in ("top1_colour_shape", "top1_colour", "top1_shape",
                                              "top1_colour_shape_by_pixels"))
    rec = C.text_image_recall(lambda ims: moved.embedder.embed_images([Image.fromarray(i) for i in ims]),
                              moved.embedder.embed_texts, image_size=32, per_class=1)
    assert rec["queries"] == 96 and 0.0 <= rec["recall@1"] <= rec["recall@5"] <= 1.0


def test_shipped_gallery_and_trained_clip():
    idx = RetrievalIndex.load(REPO / "assets" / "gallery_index")  # offline, no arguments: the recorded model
    assert idx.model_id == ClipModelSpec.parse(MINI_CLIP_NAME).model_id
    assert len(idx) >= 500 and all(world.parse_caption(e["caption"]) for e in idx.entries)
    res = C.evaluate_retrieval(idx, n=300, seed=123)
    assert res["top1_colour_shape"] >= 0.9 and res["top1_colour_shape_by_pixels"] >= 0.9, res
    hit = idx.search_text("a red circle moves left on a black background", 1)[0]
    assert world.parse_caption(hit.caption)["colour"] == "red" and "circle" in hit.caption
