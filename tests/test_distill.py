import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from magic_demo import world
from magic_demo.distill.cfg import cfg_distill_loss, student_from_teacher
from magic_demo.distill.dmd2 import DMD2, DMD2Config
from magic_demo.pipeline import MagicI2VPipeline, PromptEmbeds
from magic_demo.presets import Preset, load_pipeline
from magic_demo.sampling import build_sigmas, make_scheduler
from magic_demo.tiny import build_tiny_components
from magic_demo.train.batches import encode_batch, sample_clips, velocity


def tiny_batch(pipe, captions=None):
    video, caps, firsts = sample_clips(step=0, batch=2, frames=5, size=32, fps=8, seed=0, dropout=0.0)
    return encode_batch(pipe, video, captions or caps, firsts)


def test_dmd2_updates_generator_once_per_five_fake_updates_and_keeps_real_frozen():
    torch.manual_seed(0)
    pipe = MagicI2VPipeline(**build_tiny_components(seed=0))
    batch = tiny_batch(pipe)
    sigmas, _ = build_sigmas(make_scheduler(), 4)
    dmd = DMD2(pipe.transformer, sigmas, DMD2Config(lora_rank=4), lr_fake=1e-3, lr_g=1e-3)
    g_before = {k: v.clone() for k, v in dmd.generator.state_dict().items()}
    base_before = {k: v.clone() for k, v in dmd.score.state_dict().items() if "lora_" not in k}
    lora_before = {k: v.clone() for k, v in dmd.score.state_dict().items() if "lora_" in k}
    gen = torch.Generator().manual_seed(0)
    g_steps = []
    for i in range(10):
        logs = dmd.step(batch, gen)
        g_steps.append("loss_g" in logs)
        if i == 3:  # four fake updates so far: G untouched
            assert all(torch.equal(v, dmd.generator.state_dict()[k]) for k, v in g_before.items())
    assert g_steps == [False, False, False, False, True] * 2
    assert dmd.fake_updates == 10 and dmd.g_updates == 2
    assert any(not torch.equal(v, dmd.generator.state_dict()[k]) for k, v in g_before.items())  # G changed
    after = dmd.score.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in base_before.items())  # the real/fake base is frozen
    assert any(not torch.equal(v, after[k]) for k, v in lora_before.items())  # only the LoRA learned
    # the real score is the same network at LoRA scale 0.25: it differs from the fake (1.0) and the base (0.0)
    z, t = torch.randn_like(batch.x0), torch.full((2,), 0.5)
    with torch.no_grad():
        real = dmd.score_velocity(z, t, batch, 0.25)
        fake = dmd.score_velocity(z, t, batch, 1.0)
        base = dmd.score_velocity(z, t, batch, 0.0)
    assert not torch.allclose(real, fake) and not torch.allclose(real, base)
    # each adapted layer's weight is W + scale * dW: the real model sits a quarter of the way to the fake one
    layer = dmd.score.transformer_blocks[0].attn.to_q
    x = torch.randn(3, layer.in_features)
    outs = {}
    with torch.no_grad():
        for scale in (0.0, 0.25, 1.0):
            dmd.score.set_adapters(["fake"], weights=[scale])
            outs[scale] = layer(x)
    assert torch.allclose(outs[0.25], outs[0.0] + 0.25 * (outs[1.0] - outs[0.0]), atol=1e-5)


def test_cfg_student_starts_as_teacher_and_learns_to_read_guidance():
    torch.manual_seed(0)
    pipe = MagicI2VPipeline(**build_tiny_components(seed=0))
    teacher = pipe.transformer
    student = student_from_teacher(teacher)
    batch = tiny_batch(pipe)
    empty = tiny_batch(pipe, captions=["", ""])
    z, t = torch.randn_like(batch.x0), torch.full((2,), 0.7)
    with torch.no_grad():
        ref = velocity(teacher, z, t, batch)
        assert torch.allclose(velocity(student, z, t, batch, torch.full((2,), 3.0)), ref, atol=1e-5)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):
        loss, logs = cfg_distill_loss(student, teacher, batch, empty, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert set(logs) == {"loss_cfg", "loss_base"}
    with torch.no_grad():
        a = velocity(student, z, t, batch, torch.full((2,), 0.0))
        b = velocity(student, z, t, batch, torch.full((2,), 5.0))
    assert not torch.allclose(a, b, atol=1e-4)  # the output now depends on the guidance input


def test_cfg_distill_loss_with_unit_weights_is_the_plain_loss_and_weights_change_it():
    torch.manual_seed(0)
    pipe = MagicI2VPipeline(**build_tiny_components(seed=0))
    teacher = pipe.transformer
    student = student_from_teacher(teacher)
    batch, empty = tiny_batch(pipe), tiny_batch(pipe, ["", ""])
    ones = torch.ones(2, 1, *batch.x0.shape[2:])
    heavy = ones.clone()
    heavy[:, :, :, :2] = 10.0  # the top half of every latent frame
    losses = [cfg_distill_loss(student, teacher, batch, empty, torch.Generator().manual_seed(3), weights=w)[0].item()
              for w in (None, ones, heavy)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) and losses[2] != pytest.approx(losses[0], rel=1e-3)


def test_cfg_distill_condition_noise_reaches_the_student_only():
    pipe = MagicI2VPipeline(**build_tiny_components(seed=0))
    teacher, student = pipe.transformer, student_from_teacher(pipe.transformer)
    batch, empty = tiny_batch(pipe), tiny_batch(pipe, ["", ""])
    c = batch.x0.shape[1]

    class Recorder:  # what each model was conditioned on
        def __init__(self, model):
            self.model, self.config, self.conds = model, model.config, []

        def __call__(self, hidden_states, **kwargs):
            self.conds.append(hidden_states[:, c:].detach().clone())
            return self.model(hidden_states=hidden_states, **kwargs)

    seen_teacher, seen_student = Recorder(teacher), Recorder(student)
    for seed in range(6):
        cfg_distill_loss(seen_student, seen_teacher, batch, empty, torch.Generator().manual_seed(seed),
                         condition_noise=0.5)
    assert len(seen_teacher.conds) == len(seen_student.conds) == 12
    assert all(torch.equal(x, batch.cond) for x in seen_teacher.conds)  # the teacher always sees the clean frame
    noised = [not torch.equal(x, batch.cond) for x in seen_student.conds]
    assert any(noised)
    assert all(torch.equal(x[:, :, 1:], batch.cond[:, :, 1:]) for x in seen_student.conds)  # only frame 0's latent
    plain = Recorder(student)
    cfg_distill_loss(plain, teacher, batch, empty, torch.Generator().manual_seed(0))
    assert all(torch.equal(x, batch.cond) for x in plain.conds)  # off by default


def tiny_student_pipe():
    """A seeded tiny CFG student (the tiny teacher plus a guidance embedding) and a pipeline around it."""
    torch.manual_seed(0)
    comps = build_tiny_components(seed=0)
    student = student_from_teacher(comps.pop("transformer"))
    return student, MagicI2VPipeline(transformer=student, **comps)


def test_world_tune_samples_as_the_pipeline_does_and_trains_only_the_student():
    from magic_demo.distill.world_tune import sample_with_grad, world_tune_loss
    from magic_demo.pipeline import PromptEmbeds
    from magic_demo.train.batches import step_specs

    student, pipe = tiny_student_pipe()
    video, captions, firsts = sample_clips(step=0, batch=2, frames=5, size=32, fps=8, seed=0, dropout=0.0)
    specs = step_specs(0, 2, seed=0)
    assert [world.caption(s) for s in specs] == captions  # the specs sample_clips rendered
    batch = encode_batch(pipe, video, captions, firsts)
    sigmas, _ = build_sigmas(make_scheduler(), 4)
    one = batch.rows(slice(0, 1))
    sampled = sample_with_grad(student, one, sigmas, 1.0, torch.Generator().manual_seed(5))
    piped = pipe.denoise(one.cond, PromptEmbeds(one.embeds, one.mask, one.pooled), 4, torch.Generator().manual_seed(5),
                         1.0)
    assert sampled.requires_grad and torch.allclose(sampled.detach(), piped, atol=1e-5)

    pipe.vae.requires_grad_(False)
    loss, logs = world_tune_loss(student, pipe.vae, batch, specs, sigmas, 1.0, torch.Generator().manual_seed(0), 4.0)
    loss.backward()
    assert set(logs) == {"loss_world", "redrawn", "wrong"} and 0.0 <= logs["redrawn"] <= 1.0
    assert np.isfinite(logs["loss_world"]) and logs["loss_world"] == pytest.approx(loss.item())
    assert logs["wrong"].shape == (2,) and ((logs["wrong"] >= 0) & (logs["wrong"] <= 1)).all()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in pipe.vae.parameters())


def test_chained_rows_are_second_windows_started_from_the_students_own_last_frame():
    from magic_demo.distill.world_tune import chain_windows, next_window_starts
    from magic_demo.windows import match_colours

    student, pipe = tiny_student_pipe()
    video, captions, firsts = sample_clips(step=3, batch=3, frames=9, size=32, fps=8, seed=0, dropout=0.0)
    sigmas, _ = build_sigmas(make_scheduler(), 4)
    out, starts = chain_windows(student, pipe, video, captions, firsts, 2, 5, sigmas, 1.0,
                                torch.Generator().manual_seed(4))
    assert out.shape == (3, 3, 5, 32, 32) and starts[2] is None
    assert torch.equal(out[:2], video[:2, :, 4:]) and torch.equal(out[2], video[2, :, :5])  # the world goes on
    # the start frames are the last frames of the student's first windows, colour-matched as the app does
    first = encode_batch(pipe, video[:2, :, :5], captions[:2], firsts[:2])
    sample = pipe.denoise(first.cond[:1], PromptEmbeds(first.embeds[:1], first.mask[:1], first.pooled[:1]), 4,
                          torch.Generator().manual_seed(9), 1.0)
    again = next_window_starts(student, pipe.vae, first.rows(slice(0, 1)), sigmas, 1.0,
                               torch.Generator().manual_seed(9), firsts[:1])[0]
    expected = match_colours(pipe.decode(sample)[-1].numpy(), np.asarray(firsts[0]))
    assert np.abs(np.asarray(again).astype(int) - expected).max() <= 1
    # chained rows are conditioned on their start frame; the VLM still sees the video's first frame
    batch = encode_batch(pipe, out, captions, firsts, None, starts)
    plain = encode_batch(pipe, out, captions, firsts)
    assert torch.allclose(batch.cond[0, :, :1][None, :-1], pipe.encode_image(starts[0]), atol=1e-6)
    assert torch.equal(batch.cond[2], plain.cond[2]) and torch.equal(batch.embeds, plain.embeds)
    assert not torch.equal(batch.cond[0], plain.cond[0])


def test_distillation_runner_resumes_and_exports_a_loadable_student(tmp_path):
    from diffusers import AutoencoderTiny, HunyuanVideoTransformer3DModel

    from magic_demo.train import distill, i2v
    from tests.test_train_i2v import tiny_vae_folder

    vae = tiny_vae_folder(tmp_path / "vae")
    i2v.main(["--out", str(tmp_path / "run"), "--vae", str(vae), "--export", str(tmp_path / "mini"), "--batch", "1",
              "--frames", "5", "--size", "32", "--eval-clips", "1", "--config", "test", "--max-steps", "1"])
    common = ["--preset-dir", str(tmp_path / "mini"), "--batch", "1", "--frames", "5", "--size", "32",
              "--eval-clips", "1", "--eval-every", "2", "--threads", "1"]
    distill.main(["cfg", "--out", str(tmp_path / "cfg"), "--export", str(tmp_path / "student"), "--max-iters", "2",
                  "--anneal", "2", "--shape-weight", "4", "--condition-noise", "0.3", *common])
    opt = torch.load(tmp_path / "cfg" / "ckpt.pt", weights_only=True)["opt"]
    assert opt["param_groups"][0]["lr"] == pytest.approx(1e-4 / 2)  # the last iteration: 1 of the anneal's 2 left
    with pytest.raises(SystemExit):  # the anneal is the cfg recipe's
        distill.main(["dmd2", "--out", str(tmp_path / "x"), "--max-iters", "2", "--anneal", "2", *common])
    with pytest.raises(SystemExit):  # and so is the shape weight
        distill.main(["dmd2", "--out", str(tmp_path / "x"), "--max-iters", "2", "--shape-weight", "4", *common])
    with pytest.raises(SystemExit):  # and the condition noise
        distill.main(["dmd2", "--out", str(tmp_path / "x"), "--max-iters", "2", "--condition-noise", "0.3", *common])
    with pytest.raises(SystemExit):  # and the edge starts
        distill.main(["dmd2", "--out", str(tmp_path / "x"), "--max-iters", "2", "--edge-starts", "0.3", *common])
    student = HunyuanVideoTransformer3DModel.from_pretrained(tmp_path / "student")
    assert student.config.guidance_embeds and student.config.in_channels == 9
    # world tuning goes on from that student, with the CFG loss and the world-target loss on its own samples
    distill.main(["world", "--out", str(tmp_path / "world"), "--init", str(tmp_path / "student"), "--export",
                  str(tmp_path / "tuned"), "--max-iters", "1", "--shape-weight", "4", "--world-focus", "--edge-starts", "0.5",
                  "--chain", "1", *common])  # every clip a second window: the world loss alone
    tuned = HunyuanVideoTransformer3DModel.from_pretrained(tmp_path / "tuned").state_dict()
    assert any(not torch.equal(p, tuned[k]) for k, p in student.state_dict().items())
    assert '"iter": 1' in (tmp_path / "world" / "curve.json").read_text()
    focus = json.loads(torch.load(tmp_path / "world" / "ckpt.pt", weights_only=True)["focus"])
    assert sum(focus["seen"].values()) == pytest.approx(1.0)  # the one clip of the one iteration, by its group
    assert all(g.split("|")[0] in world.SHAPES and g.split("|")[1] in world.BACKGROUNDS for g in focus["seen"])
    # half the batch chained: the CFG-distillation loss on the other half only
    distill.main(["world", "--out", str(tmp_path / "half"), "--init", str(tmp_path / "student"), "--max-iters", "1",
                  "--chain", "0.5", *common, "--batch", "2"])
    assert '"iter": 1' in (tmp_path / "half" / "curve.json").read_text()
    # --mlp-ratio widens the student first (same function, see test_train_i2v), and a resumed run loads the wide weights
    for iters in ("1", "2"):
        distill.main(["world", "--out", str(tmp_path / "wide"), "--init", str(tmp_path / "student"), "--mlp-ratio", "4",
                      "--export", str(tmp_path / "wide_student"), "--max-iters", iters, *common])
    wide = HunyuanVideoTransformer3DModel.from_pretrained(tmp_path / "wide_student")
    assert wide.config.mlp_ratio == 4.0 and student.config.mlp_ratio == 2.0
    log = (tmp_path / "wide" / "train.log").read_text()
    assert "widened from ratio 2.0 to 4.0" in log and "resumed at iteration 1" in log
    with pytest.raises(SystemExit):  # the widening is the world recipe's
        distill.main(["cfg", "--out", str(tmp_path / "x"), "--mlp-ratio", "4", *common])
    with pytest.raises(SystemExit):  # --init is the world recipe's
        distill.main(["cfg", "--out", str(tmp_path / "x"), "--init", str(tmp_path / "student"), *common])
    with pytest.raises(SystemExit):  # and so is the failure focus
        distill.main(["cfg", "--out", str(tmp_path / "x"), "--world-focus", *common])
    with pytest.raises(SystemExit):  # and the chained windows
        distill.main(["cfg", "--out", str(tmp_path / "x"), "--chain", "0.5", *common])
    # --decoder-lr trains the decoder with the student and saves the whole VAE (encoder unchanged) to <out>/vae
    distill.main(["world", "--out", str(tmp_path / "wdec"), "--init", str(tmp_path / "student"), "--max-iters", "1",
                  "--decoder-lr", "1e-3", *common])
    before = AutoencoderTiny.from_pretrained(tmp_path / "mini" / "vae")
    after = AutoencoderTiny.from_pretrained(tmp_path / "wdec" / "vae")
    assert any(not torch.equal(p, q) for p, q in zip(before.decoder.parameters(), after.decoder.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(before.encoder.parameters(), after.encoder.parameters()))
    assert "decoder" in torch.load(tmp_path / "wdec" / "ckpt.pt", weights_only=True)
    with pytest.raises(SystemExit):
        distill.main(["cfg", "--out", str(tmp_path / "x"), "--decoder-lr", "1e-3", *common])
    distill.main(["dmd2", "--out", str(tmp_path / "dmd2"), "--base", str(tmp_path / "student"), "--guidance", "3",
                  "--export", str(tmp_path / "g4"), "--max-iters", "2", *common])
    distill.main(["dmd2", "--out", str(tmp_path / "dmd2"), "--base", str(tmp_path / "student"), "--guidance", "3",
                  "--export", str(tmp_path / "g4"), "--max-iters", "6", *common])  # resumes at 2
    curve = (tmp_path / "dmd2" / "curve.json").read_text()
    assert '"iter": 0' in curve and '"iter": 2' in curve and '"iter": 6' in curve
    assert "resumed at iteration 2" in (tmp_path / "dmd2" / "train.log").read_text()
    state = torch.load(tmp_path / "dmd2" / "ckpt.pt", weights_only=True)["dmd2"]
    assert (state["fake_updates"], state["g_updates"]) == (6, 1)  # counters survive the restart
    g4 = HunyuanVideoTransformer3DModel.from_pretrained(tmp_path / "g4")
    assert g4.config.guidance_embeds
    # the 5th fake update was followed by a generator update: the exported generator moved off its (frozen) base
    base = HunyuanVideoTransformer3DModel.from_pretrained(tmp_path / "student").state_dict()
    assert any(not torch.equal(p, base[k]) for k, p in g4.state_dict().items())
    # the T2V variant of the recipe (Fig. 5) runs on the same teacher
    distill.main(["dmd2", "--t2v", "--out", str(tmp_path / "t2v"), "--max-iters", "2", *common])
    assert '"iter": 2' in (tmp_path / "t2v" / "curve.json").read_text()
    # shipping: the student becomes the preset's transformer/, the teacher stays loadable from teacher/
    shutil.copytree(tmp_path / "g4", tmp_path / "mini" / "transformer")
    kw = dict(path=tmp_path / "mini", width=32, height=32, buckets=((32, 32),), window_frames=5)
    student = load_pipeline(Preset("student", "4-step student", guidance_scale=3.0, **kw))
    teacher = load_pipeline(Preset("teacher", "teacher", transformer_folder="teacher", true_cfg_scale=2.0, **kw))
    assert student.has_guidance_input and not teacher.has_guidance_input
    image = Image.fromarray(np.zeros((32, 32, 3), np.uint8))
    assert student(image, "a red circle moves left on a black background", num_frames=5, steps=4,
                   guidance_scale=3.0).shape == (5, 32, 32, 3)


def test_the_first_mini_presets_are_the_distilled_students_and_the_teacher():
    student, student8, teacher = (load_pipeline(n) for n in ("mini-x8", "mini-x8-8step", "mini-x8-teacher"))
    assert student.has_guidance_input and student8.has_guidance_input and not teacher.has_guidance_input
    assert (student.preset.steps, student8.preset.steps) == (4, 8) and teacher.preset.true_cfg_scale > 1
    # the students differ from each other and from the teacher they were distilled from (int8 weights)
    q = [p.transformer.transformer_blocks[0].attn.to_q.weight.dequantize() for p in (student, student8, teacher)]
    assert not torch.equal(q[0], q[1]) and not torch.equal(q[0], q[2])


def test_the_mini_presets_run_on_their_own_16x16_latents():
    student, teacher = load_pipeline("mini"), load_pipeline("mini-teacher")
    assert student.has_guidance_input and not teacher.has_guidance_input and teacher.preset.true_cfg_scale > 1
    image = Image.fromarray(np.zeros((64, 64, 3), np.uint8))
    for pipe in (student, teacher):
        assert pipe.geometry.spatial_ratio == 4 and pipe.transformer.config.patch_size == 2
        seen = []
        clip = pipe(image, "a red circle moves left on a black background", num_frames=5, steps=2,
                    callback=lambda i, x: seen.append(tuple(x.shape)))
        assert clip.shape == (5, 64, 64, 3) and seen == [(1, 16, 5, 16, 16)] * 2
