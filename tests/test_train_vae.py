import json

import numpy as np
import pytest
import torch

from magic_demo.train import vae as tv


@pytest.mark.parametrize("arch,frames", [("test-tiny", 2), ("test-hv", 5)])
def test_train_resume_export(tmp_path, arch, frames):
    out, exp = tmp_path / "run", tmp_path / "export"
    common = ["--out", str(out), "--arch", arch, "--frames", str(frames), "--batch", "2", "--export", str(exp),
              "--log-every", "1", "--eval-frames", "5", "--eval-clips", "2"]
    assert tv.main(common + ["--steps", "2"]) == 2
    ck = torch.load(out / "ckpt_latest.pt", map_location="cpu", weights_only=False)
    assert ck["step"] == 2 and {"model", "optimizer", "rng"} <= set(ck)
    assert tv.main(common + ["--steps", "3"]) == 3  # resumes and continues the count
    assert "resumed from" in (out / "log.txt").read_text()
    assert torch.load(out / "ckpt_latest.pt", map_location="cpu", weights_only=False)["step"] == 3

    assert (exp / "diffusion_pytorch_model.safetensors").exists() and (exp / "reconstructions.png").exists()
    cfg = json.loads((exp / "config.json").read_text())
    assert cfg["scaling_factor"] > 0
    model = tv.prepare_model(tv.build_model(arch).__class__.from_pretrained(exp))
    T = 5
    x, _, _ = tv.make_batch([1, 2], T)
    with torch.no_grad():
        z = tv.encode(model, x)
        y = tv.decode(model, z)
    assert z.shape[-1] == 64 // 8
    assert y.shape[:2] == (2, 3) and y.shape[-2:] == (64, 64) and y.shape[2] >= T
    assert np.isfinite(y.numpy()).all()


def test_export_selection_ranks_world_metrics_before_psnr(tmp_path):
    sharp = {"frame_colour_kept": 0.9, "frame_shape_kept": 0.85, "psnr": 29.0}
    blurry = {"frame_colour_kept": 0.8, "frame_shape_kept": 0.7, "psnr": 31.0}
    assert tv.selection_score(sharp) > tv.selection_score(blurry)
    tie = dict(sharp, psnr=30.0)
    assert tv.selection_score(tie) > tv.selection_score(sharp)  # PSNR breaks ties
    model = tv.prepare_model(tv.build_model("test-tiny"))
    m = tv.evaluate(model, num_clips=2, num_frames=3)
    assert 0.0 <= m["frame_colour_kept"] <= 1.0 and 0.0 <= m["frame_shape_kept"] <= 1.0


def test_latent_scale_does_not_depend_on_the_eval_clip_count(tmp_path):
    """A decoder-only run (frozen encoder) evaluated on more clips must export the very same scaling_factor:
    the denoiser was trained on latents scaled by it."""
    torch.manual_seed(0)
    model = tv.prepare_model(tv.build_model("test-tiny"))
    scales = []
    for clips in (2, 3):
        m = tv.evaluate(model, num_clips=clips, num_frames=3)
        tv.export(model, tmp_path / f"e{clips}", m, "test-tiny", step=1)
        scales.append(json.loads((tmp_path / f"e{clips}" / "config.json").read_text())["scaling_factor"])
    assert scales[0] == scales[1] == tv.latent_scale(model)[0]


def test_x4_arch_has_16x16_latents_and_the_engine_reads_its_ratio():
    from magic_demo.autoencoder import latent_geometry

    model = tv.build_model("tiny-x4")
    x, _, _ = tv.make_batch([3], 2)
    with torch.no_grad():
        z = tv.encode(model, x)
    assert tuple(z.shape) == (1, 16, 2, 16, 16)
    geom = latent_geometry(model)
    assert geom.spatial_ratio == 4 and geom.temporal_ratio == 1 and geom.channels == 16
