import json

import torch
from diffusers import AutoencoderTiny

from magic_demo.autoencoder import latent_geometry
from magic_demo.train import decoder as td

TEACHER = "assets/mini/t2i/vae"  # the full-width VAE (the default teacher)


def test_decoder_distillation_resumes_and_exports_a_drop_in_vae(tmp_path):
    out, exp = tmp_path / "run", tmp_path / "export"
    common = ["--out", str(out), "--teacher", TEACHER, "--export", str(exp), "--clips", "2", "--clip-frames", "3",
              "--windows", "1", "--batch", "4", "--channels", "4", "--blocks", "1,1,1,1", "--log-every", "1"]
    assert td.main(common + ["--steps", "2"]) == 2
    data = torch.load(out / "data.pt", weights_only=True)
    # 2 clips x 3 frames encoded + one 17-frame window denoised by the mini preset, teacher frames as targets
    assert data["train"]["enc"].shape == (6, 16, 8, 8) and data["train"]["den"].shape == (17, 16, 8, 8)
    assert data["train"]["den_y"].shape == (17, 3, 64, 64) and data["train"]["den_y"].dtype == torch.uint8
    assert td.main(common + ["--steps", "3"]) == 3  # resumes from the checkpoint and reuses the cached data
    assert "resumed at step 2" in (out / "log.txt").read_text()

    teacher, student = AutoencoderTiny.from_pretrained(TEACHER), AutoencoderTiny.from_pretrained(exp)
    assert latent_geometry(student) == latent_geometry(teacher)  # same latent space and scaling
    for a, b in zip(teacher.encoder.state_dict().values(), student.encoder.state_dict().values()):
        assert torch.equal(a, b)  # the encoder is the teacher's, untouched
    assert student.config.decoder_block_out_channels == [4, 4, 4, 4]
    metrics = json.loads((exp / "metrics.json").read_text())
    assert 0 <= metrics["den_class_agree"] <= 1 and metrics["den_psnr"] > 5


def test_frame_weights_mark_the_shape():
    y = -torch.ones(1, 3, 8, 8)
    y[:, 0, 2:4, 2:4] = 1.0  # a red square on black
    w = td.frame_weights(y, 4.0)
    assert w.shape == (1, 1, 8, 8) and w.sum() == 64 + 4 * 4
    assert torch.all(w[0, 0, 2:4, 2:4] == 5)
