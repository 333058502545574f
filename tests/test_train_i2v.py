import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny
from PIL import Image

from magic_demo.presets import Preset, load_pipeline
from magic_demo.train import i2v
from magic_demo.train.batches import sample_clips


def tiny_vae_folder(path):
    torch.manual_seed(0)
    AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                    latent_channels=4).save_pretrained(path, safe_serialization=True)
    return path


def exported_tiny_teacher(tmp_path, steps: int, warmup: int) -> list[str]:
    """Train a tiny teacher for `steps` steps and export it to tmp_path/mini (a preset folder to --init from);
    returns the trainer arguments the two runs share."""
    vae = tiny_vae_folder(tmp_path / "vae")
    common = ["--vae", str(vae), "--batch", "1", "--frames", "5", "--size", "32", "--eval-clips", "1",
              "--config", "test", "--warmup", str(warmup)]
    i2v.main(["--out", str(tmp_path / "a"), "--export", str(tmp_path / "mini"), "--max-steps", str(steps), *common])
    return common


def continued_tiny_teacher(tmp_path, *flags: str):
    """Export a 1-step tiny teacher, continue it one step to tmp_path/b with `flags` (e.g. --mlp-ratio 4); returns
    (the shared trainer arguments, the continued run's log, its step-2 snapshot)."""
    from diffusers import HunyuanVideoTransformer3DModel

    common = exported_tiny_teacher(tmp_path, steps=1, warmup=1)
    i2v.main(["--out", str(tmp_path / "b"), "--init", str(tmp_path / "mini"), *flags, "--max-steps", "2", *common])
    snap = HunyuanVideoTransformer3DModel.from_pretrained(tmp_path / "b" / "snapshots" / "step_000002")
    return common, (tmp_path / "b" / "train.log").read_text(), snap


def test_i2v_trainer_checkpoints_resumes_and_exports_a_loadable_preset(tmp_path):
    vae = tiny_vae_folder(tmp_path / "vae")
    common = ["--out", str(tmp_path / "run"), "--vae", str(vae), "--export", str(tmp_path / "mini"), "--batch", "2",
              "--frames", "5", "--size", "32", "--eval-clips", "1", "--config", "test", "--warmup", "1"]
    i2v.main(common + ["--max-steps", "2"])
    first = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert first["step"] == 2
    i2v.main(common + ["--max-steps", "3"])  # resumes: one more step
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 3
    log = (tmp_path / "run" / "train.log").read_text()
    assert "resumed at step 2" in log and "eval (4 steps" in log
    info = json.loads((tmp_path / "mini" / "training.json").read_text())
    assert info["teacher"]["i2v_step"] in (2, 3) and 0 <= info["teacher"]["eval_4_steps"]["motion_accuracy"] <= 1
    # the exported folder is a complete preset the engine loads (int8 by default)
    preset = Preset("exported", "test export", path=tmp_path / "mini", width=32, height=32, buckets=((32, 32),),
                    window_frames=5, transformer_folder="teacher")
    pipe = load_pipeline(preset)
    frames = pipe(Image.fromarray(np.zeros((32, 32, 3), np.uint8)), "a red circle moves left on a black background",
                  num_frames=5, steps=2)
    assert frames.shape == (5, 32, 32, 3)


def test_training_batches_follow_the_world_grammar():
    video, captions, firsts = sample_clips(step=0, batch=4, frames=5, size=32, fps=8, seed=0, dropout=0.0)
    assert video.shape == (4, 3, 5, 32, 32) and video.min() >= -1 and video.max() <= 1
    assert all(" on a " in c and c.endswith("background") for c in captions)
    assert firsts[0].size == (32, 32)
    _, dropped, _ = sample_clips(step=0, batch=64, frames=1, size=32, fps=8, seed=0, dropout=0.5)
    assert 10 < dropped.count("") < 54  # captions dropped for CFG training


def test_training_continues_from_a_shipped_preset_folder(tmp_path):
    vae = tiny_vae_folder(tmp_path / "vae")
    common = ["--vae", str(vae), "--batch", "1", "--frames", "5", "--size", "32", "--eval-clips", "1",
              "--config", "test", "--warmup", "1"]
    i2v.main(["--out", str(tmp_path / "a"), "--export", str(tmp_path / "mini"), "--max-steps", "2", *common])
    i2v.main(["--out", str(tmp_path / "b"), "--init", str(tmp_path / "mini"), "--export", str(tmp_path / "mini2"),
              "--max-steps", "3", *common])
    log = (tmp_path / "b" / "train.log").read_text()
    assert "initialised from" in log and "(step 2)" in log
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["step"] == 3
    for name in ("text_encoder", "vae"):  # the very same frozen components travel on
        a = (tmp_path / "mini" / name).glob("*.safetensors")
        b = tmp_path / "b" / "frozen" / name
        assert all((b / f.name).read_bytes() == f.read_bytes() for f in a)


def test_text_only_rows_carry_no_trace_of_their_first_frame(tiny_pipe):
    from magic_demo.pipeline import neutral_image
    from magic_demo.train.batches import encode_batch

    video, captions, firsts = sample_clips(step=3, batch=3, frames=5, size=32, fps=8, seed=0, dropout=0.0)
    batch = encode_batch(tiny_pipe, video, captions, firsts, text_only=[False, True, False])
    assert batch.cond[1].abs().sum() == 0  # no image latent, no mask
    assert batch.cond[0, -1, 0].min() == 1 and batch.cond[2, :-1, 0].abs().sum() > 0  # image rows untouched
    # the VLM saw the neutral image, not the clip's first frame
    blank = tiny_pipe.encode_prompt(captions[1], neutral_image(firsts[1].size))
    own = tiny_pipe.encode_prompt(captions[1], firsts[1])
    n = blank.embeds.shape[1]  # the batch is padded to its longest caption; the rest of this row is masked
    assert torch.allclose(batch.embeds[1, :n], blank.embeds[0], atol=1e-5) and not batch.mask[1, n:].any()
    assert not torch.allclose(batch.embeds[1, :n], own.embeds[0], atol=1e-3)


def test_weight_average_is_what_gets_snapshotted_and_resumed(tmp_path):
    from diffusers import HunyuanVideoTransformer3DModel

    vae = tiny_vae_folder(tmp_path / "vae")
    common = ["--out", str(tmp_path / "run"), "--vae", str(vae), "--batch", "2", "--frames", "5", "--size", "32",
              "--eval-clips", "1", "--config", "test", "--warmup", "1", "--ema", "0.9", "--text-lr-scale", "10"]
    i2v.main(common + ["--max-steps", "3"])
    ck = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ck["ema_steps"] == 3 and [g["lr_scale"] for g in ck["opt"]["param_groups"]] == [1.0, 10.0]
    snap = HunyuanVideoTransformer3DModel.from_pretrained(tmp_path / "run" / "snapshots" / "step_000003")
    name = "proj_out.weight"
    assert torch.equal(snap.state_dict()[name], ck["ema"][name])  # the snapshot is the average ...
    assert not torch.equal(ck["ema"][name], ck["model"][name])  # ... which lags the trained weights
    i2v.main(common + ["--max-steps", "4"])
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["ema_steps"] == 4  # resumed, not restarted


def test_text_input_layers_get_their_own_lr_group():
    from magic_demo.tiny import TinyConfig, build_transformer

    t = build_transformer(TinyConfig(patch_size=2))
    plain, split = i2v.param_groups(t, 1.0), i2v.param_groups(t, 5.0)
    assert len(plain) == 1 and len(split) == 2 and split[1]["lr_scale"] == 5.0
    text = {id(p) for p in split[1]["params"]}
    names = [n for n, p in t.named_parameters() if id(p) in text]
    assert names and all(n.startswith(i2v.TEXT_INPUT_LAYERS) for n in names)
    assert sum(p.numel() for g in split for p in g["params"]) == sum(p.numel() for p in t.parameters())


def test_echo_reuses_each_encoded_batch_for_several_steps(tmp_path, capsys):
    vae = tiny_vae_folder(tmp_path / "vae")
    common = ["--vae", str(vae), "--batch", "1", "--frames", "5", "--size", "32", "--eval-clips", "1",
              "--config", "test", "--warmup", "1", "--max-steps", "5"]
    i2v.main(["--out", str(tmp_path / "echo"), "--echo", "2", *common])
    i2v.main(["--out", str(tmp_path / "plain"), *common])
    assert "done at step 5 (3 batches encoded this run)" in (tmp_path / "echo" / "train.log").read_text()
    assert "done at step 5 (5 batches encoded this run)" in (tmp_path / "plain" / "train.log").read_text()
    with pytest.raises(SystemExit):
        i2v.main(["--out", str(tmp_path / "bad"), "--echo", "0", *common])
    assert "--echo must be >= 1, got 0" in capsys.readouterr().err


def test_repatch_to_1_keeps_flat_regions_and_averages_the_outputs():
    from magic_demo.tiny import TinyConfig, build_transformer

    torch.manual_seed(0)
    src = build_transformer(TinyConfig(patch_size=2))
    dst = build_transformer(TinyConfig(patch_size=1))
    state = i2v.repatch_to_1(src.state_dict(), 2, 1)
    dst.load_state_dict(state)  # every shape fits
    # a flat 2x2 patch gives the patch-2 model the same token as one latent pixel gives the patch-1 model
    x = torch.randn(1, src.config.in_channels, 1, 1, 1)
    token_1 = dst.x_embedder.proj(x).flatten()
    token_2 = src.x_embedder.proj(x.expand(-1, -1, -1, 2, 2).contiguous()).flatten()
    assert torch.allclose(token_1, token_2, atol=1e-5)
    # each output channel is the mean of its four sub-positions
    w = src.proj_out.weight.view(src.config.out_channels, 4, -1)
    assert torch.allclose(dst.proj_out.weight, w.mean(1)) and not torch.allclose(dst.proj_out.weight, w[:, 0])
    with pytest.raises(ValueError, match="patch 2 -> 2"):
        i2v.repatch_to_1(src.state_dict(), 2, 2)


def test_a_patch_1_teacher_starts_from_a_patch_2_preset_with_a_warmup(tmp_path):
    from diffusers import HunyuanVideoTransformer3DModel

    common = exported_tiny_teacher(tmp_path, steps=2, warmup=4)
    i2v.main(["--out", str(tmp_path / "b"), "--init", str(tmp_path / "mini"), "--patch-size", "1",
              "--max-steps", "3", *common])
    log = (tmp_path / "b" / "train.log").read_text()
    assert "patch 2 weights converted to patch 1" in log
    opt = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["opt"]
    assert opt["param_groups"][0]["lr"] == pytest.approx(5e-4 / 4)  # a fresh optimizer warms up again: 1 of 4 steps
    snap = HunyuanVideoTransformer3DModel.from_pretrained(tmp_path / "b" / "snapshots" / "step_000003")
    assert snap.config.patch_size == 1


def tiny_forward_args(model) -> dict:
    """A random batch (2 clips of 3 latent frames, 6 text tokens) for a test-config transformer's forward."""
    return dict(hidden_states=torch.randn(2, model.config.in_channels, 3, 8, 8), timestep=torch.tensor([900.0, 300.0]),
                encoder_hidden_states=torch.randn(2, 6, 16), encoder_attention_mask=torch.ones(2, 6, dtype=torch.bool),
                pooled_projections=torch.randn(2, 16), return_dict=False)


def test_widen_feed_forward_keeps_the_function_and_adds_silent_units():
    from magic_demo.tiny import TinyConfig, build_transformer

    torch.manual_seed(0)
    narrow = build_transformer(TinyConfig(patch_size=2)).eval()
    wide = build_transformer(TinyConfig(patch_size=2, mlp_ratio=6.0)).eval()
    state = i2v.widen_feed_forward(narrow.state_dict(), wide.state_dict())
    wide.load_state_dict(state)
    assert wide.transformer_blocks[0].ff.net[0].proj.out_features == 3 * narrow.transformer_blocks[0].ff.net[0].proj.out_features
    args = tiny_forward_args(narrow)
    with torch.no_grad():
        before, after = narrow(**args)[0], wide(**args)[0]
    assert before.abs().mean() > 0.1 and torch.allclose(before, after, atol=1e-5)
    # the new units are read through zeros, and their input rows are not zero (so they can start to learn)
    d = narrow.transformer_blocks[0].ff.net[2].in_features
    assert state["transformer_blocks.0.ff.net.2.weight"][:, d:].abs().max() == 0
    assert state["transformer_blocks.0.ff.net.0.proj.weight"][d:].abs().max() > 0
    h = narrow.config.num_attention_heads * narrow.config.attention_head_dim
    assert state["single_transformer_blocks.0.proj_out.weight"][:, h + d:].abs().max() == 0
    # anything but a feed-forward change is refused, by name
    other = build_transformer(TinyConfig(patch_size=1)).state_dict()
    with pytest.raises(ValueError, match="x_embedder.proj.weight.*not a feed-forward change"):
        i2v.widen_feed_forward(narrow.state_dict(), other)


def test_a_teacher_continues_with_wider_feed_forward_layers(tmp_path, capsys):
    from diffusers import HunyuanVideoTransformer3DModel

    common, log, snap = continued_tiny_teacher(tmp_path, "--mlp-ratio", "4")
    assert "feed-forward widened from ratio 2.0 to 4.0" in log
    assert snap.config.mlp_ratio == 4.0
    snap.save_pretrained(tmp_path / "wide" / "teacher")  # continuing a wide teacher keeps its width by default
    for name in i2v.FROZEN:
        (tmp_path / "wide" / name).symlink_to(tmp_path / "mini" / name)
    i2v.main(["--out", str(tmp_path / "d"), "--init", str(tmp_path / "wide"), "--max-steps", "1", *common])
    assert "widened" not in (tmp_path / "d" / "train.log").read_text()
    with pytest.raises(ValueError, match="narrows"):
        i2v.widen_feed_forward(snap.state_dict(), HunyuanVideoTransformer3DModel.from_pretrained(
            tmp_path / "a" / "snapshots" / "step_000001").state_dict())
    with pytest.raises(SystemExit):
        i2v.main(["--out", str(tmp_path / "c"), "--mlp-ratio", "0", *common])
    assert "--mlp-ratio must be > 0, got 0.0" in capsys.readouterr().err


def test_deepen_model_appends_identity_blocks_that_can_learn(tmp_path, capsys):
    from magic_demo.tiny import TinyConfig, build_transformer

    torch.manual_seed(0)
    shallow = build_transformer(TinyConfig(patch_size=2)).eval()
    deep = i2v.deepen_model(shallow, 3).eval()
    assert deep.config.num_single_layers == 3 and len(deep.single_transformer_blocks) == 3
    args = tiny_forward_args(shallow)
    with torch.no_grad():
        before, after = shallow(**args)[0], deep(**args)[0]
    assert before.abs().mean() > 0.1 and torch.allclose(before, after, atol=1e-6)
    new = deep.single_transformer_blocks[2]
    assert new.proj_out.weight.abs().max() == 0 and new.attn.to_q.weight.abs().max() > 0
    deep.train()
    deep(**args)[0].square().mean().backward()  # the zero projection gets a gradient: the block can start to learn
    assert new.proj_out.weight.grad.abs().max() > 0
    with pytest.raises(ValueError, match="single_layers=0 < the model's 1"):
        i2v.deepen_model(shallow, 0)
    # through the trainer: --init a shallower teacher with --single-layers
    common, log, snap = continued_tiny_teacher(tmp_path, "--single-layers", "2")
    assert "single-stream blocks 1 -> 2; new blocks start as the identity" in log
    assert snap.config.num_single_layers == 2
    with pytest.raises(SystemExit):
        i2v.main(["--out", str(tmp_path / "c"), "--single-layers", "0", *common])
    assert "--single-layers must be >= 1, got 0" in capsys.readouterr().err


def test_learning_rate_warms_up_holds_then_anneals_to_zero_at_max_steps():
    lr = [i2v.learning_rate(s, 1e-3, warm_from=100, warmup=10, max_steps=200, anneal=50) for s in range(100, 200)]
    assert lr[0] == pytest.approx(1e-4) and lr[9] == pytest.approx(1e-3)  # warm-up from where the optimizer began
    assert lr[10:50] == pytest.approx([1e-3] * 40)  # constant until the last 50 steps
    assert lr[75] == pytest.approx(0.5e-3) and lr[99] == pytest.approx(0.02e-3)  # linear decay towards 0 at 200
    assert i2v.learning_rate(150, 1e-3, 0, 10, 200, anneal=0) == pytest.approx(1e-3)  # no anneal: constant


def test_anneal_without_max_steps_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        i2v.main(["--out", str(tmp_path / "run"), "--anneal", "100"])


def test_an_annealed_run_steps_with_the_decayed_lr(tmp_path):
    vae = tiny_vae_folder(tmp_path / "vae")
    i2v.main(["--out", str(tmp_path / "run"), "--vae", str(vae), "--batch", "1", "--frames", "5", "--size", "32",
              "--eval-clips", "1", "--config", "test", "--warmup", "1", "--max-steps", "4", "--anneal", "2"])
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["opt"]["param_groups"][0]["lr"] == \
        pytest.approx(5e-4 / 2)  # the last step (0-based 3 of 4) had 1 of the anneal's 2 steps left


def test_shape_loss_weights_mark_the_latent_pixels_over_the_shape():
    from magic_demo import world
    from magic_demo.train.batches import shape_loss_weights, weighted_mse

    video, _, _ = sample_clips(step=5, batch=3, frames=5, size=32, fps=8, seed=0, dropout=0.0)
    w = shape_loss_weights(video, (3, 16, 5, 4, 4), 4.0)  # a per-frame VAE with x8 spatial compression
    assert w.shape == (3, 1, 5, 4, 4) and set(w.unique().tolist()) == {1.0, 4.0}
    frames = ((video.permute(0, 2, 3, 4, 1) + 1) * 127.5).round().numpy()
    for b in range(3):
        for t in range(5):
            mask = world.find_shape(frames[b, t])["mask"]  # the evaluator's own shape finder
            covered = mask.reshape(4, 8, 4, 8).any(axis=(1, 3))
            assert (w[b, 0, t] == 4.0).numpy().tolist() == covered.tolist()
    assert w.mean() < 2.5  # the shape covers a minority of latent pixels
    # a temporal VAE (4 frames per latent frame): a latent pixel is marked where any of its frames has the shape
    assert shape_loss_weights(video, (3, 16, 2, 4, 4), 4.0).shape == (3, 1, 2, 4, 4)
    pred, target = torch.randn(3, 16, 5, 4, 4), torch.randn(3, 16, 5, 4, 4)
    plain = torch.nn.functional.mse_loss(pred, target)
    assert torch.allclose(weighted_mse(pred, target), plain) and torch.allclose(
        weighted_mse(pred, target, torch.ones(3, 1, 5, 4, 4)), plain)
    target_off_shape = torch.where(w.expand_as(pred) == 4.0, pred, target)  # errors only off the shape
    assert weighted_mse(pred, target_off_shape, w) < torch.nn.functional.mse_loss(pred, target_off_shape)


def test_shape_weighted_training_runs_and_refuses_weights_below_1(tmp_path):
    vae = tiny_vae_folder(tmp_path / "vae")
    common = ["--out", str(tmp_path / "run"), "--vae", str(vae), "--batch", "2", "--frames", "5", "--size", "32",
              "--eval-clips", "1", "--config", "test", "--warmup", "1"]
    with pytest.raises(SystemExit):
        i2v.main(common + ["--shape-weight", "0.5"])
    i2v.main(common + ["--max-steps", "2", "--shape-weight", "4"])
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 2


def test_condition_noise_touches_only_the_conditioning_latents_of_image_rows(tiny_pipe):
    from magic_demo.train.batches import encode_batch, noise_condition

    video, captions, firsts = sample_clips(step=5, batch=4, frames=5, size=32, fps=8, seed=0, dropout=0.0)
    batch = encode_batch(tiny_pipe, video, captions, firsts, text_only=[False, True, False, False])
    assert noise_condition(batch, 0.0, torch.Generator().manual_seed(0)) is batch  # off: the very same batch
    c = batch.x0.shape[1]
    noised = noise_condition(batch, 0.5, torch.Generator().manual_seed(0), prob=1.0)
    delta = noised.cond - batch.cond
    assert delta[:, c:].abs().sum() == 0 and delta[:, :c, 1:].abs().sum() == 0  # mask and later frames untouched
    assert noised.cond[1].abs().sum() == 0  # a text-only row stays without an image
    per_row = delta[:, :c, :1].flatten(1).std(1)
    assert (per_row[[0, 2, 3]] > 0).all() and (per_row <= 0.5 * 1.1).all()  # std ~ U(0, 0.5) per image row
    assert torch.equal(noised.x0, batch.x0) and torch.equal(noised.embeds, batch.embeds)  # target and text kept
    assert batch.cond[0, :c, 0].abs().sum() > 0 and torch.equal(batch.cond, encode_batch(
        tiny_pipe, video, captions, firsts, text_only=[False, True, False, False]).cond)  # the input is not modified
    never = noise_condition(batch, 0.5, torch.Generator().manual_seed(0), prob=0.0)
    assert torch.equal(never.cond, batch.cond)
    rows = [noise_condition(batch, 0.5, torch.Generator().manual_seed(s), prob=0.5).cond for s in range(40)]
    changed = np.mean([not torch.equal(r[i], batch.cond[i]) for r in rows for i in (0, 2, 3)])
    assert 0.3 < changed < 0.7  # about half of the image rows


def test_condition_noise_and_edge_start_training_run_and_refuse_bad_values(tmp_path, capsys):
    vae = tiny_vae_folder(tmp_path / "vae")
    common = ["--out", str(tmp_path / "run"), "--vae", str(vae), "--batch", "2", "--frames", "5", "--size", "32",
              "--eval-clips", "1", "--config", "test", "--warmup", "1"]
    with pytest.raises(SystemExit):
        i2v.main(common + ["--condition-noise", "-0.1"])
    assert "--condition-noise must be >= 0, got -0.1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        i2v.main(common + ["--edge-starts", "1.5"])
    assert "--edge-starts must be in [0, 1], got 1.5" in capsys.readouterr().err
    i2v.main(common + ["--max-steps", "2", "--condition-noise", "0.5", "--edge-starts", "0.5"])
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 2


def test_a_teacher_for_a_new_vae_starts_from_another_teachers_blocks(tmp_path):
    from diffusers import HunyuanVideoTransformer3DModel

    vae = tiny_vae_folder(tmp_path / "vae")
    torch.manual_seed(1)  # the new VAE: x4 spatial, other latent channels
    AutoencoderTiny(encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
                    latent_channels=8, num_encoder_blocks=(1, 1, 1),
                    num_decoder_blocks=(1, 1, 1)).save_pretrained(tmp_path / "vae_x4", safe_serialization=True)
    common = ["--batch", "1", "--frames", "5", "--size", "32", "--eval-clips", "1", "--config", "test", "--warmup", "1"]
    i2v.main(["--out", str(tmp_path / "a"), "--vae", str(vae), "--export", str(tmp_path / "mini"), "--max-steps", "1",
              *common])
    i2v.main(["--out", str(tmp_path / "b"), "--vae", str(tmp_path / "vae_x4"), "--init-blocks", str(tmp_path / "mini"),
              "--patch-size", "2", "--max-steps", "1", "--lr", "1e-12", *common])
    log = (tmp_path / "b" / "train.log").read_text()
    assert "fresh: x_embedder.proj.weight, proj_out.weight, proj_out.bias" in log
    old = HunyuanVideoTransformer3DModel.from_pretrained(tmp_path / "mini" / "teacher").state_dict()
    new = HunyuanVideoTransformer3DModel.from_pretrained(tmp_path / "b" / "snapshots" / "step_000001").state_dict()
    block = "transformer_blocks.0.attn.to_q.weight"
    assert torch.allclose(old[block], new[block], atol=1e-6)  # copied (lr ~0: one step cannot move it)
    assert new["x_embedder.proj.weight"].shape != old["x_embedder.proj.weight"].shape
    frozen = tmp_path / "b" / "frozen"
    assert (frozen / "text_encoder" / "model.safetensors").read_bytes() == \
        (tmp_path / "mini" / "text_encoder" / "model.safetensors").read_bytes()
    assert AutoencoderTiny.from_pretrained(frozen / "vae").config.encoder_block_out_channels == [8, 8, 8]
    with pytest.raises(SystemExit):
        i2v.main(["--out", str(tmp_path / "c"), "--vae", str(vae), "--init", str(tmp_path / "mini"),
                  "--init-blocks", str(tmp_path / "mini"), *common])
