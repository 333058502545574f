import json

import numpy as np
import torch
from diffusers import AutoencoderTiny

from magic_demo import world
from magic_demo.autoencoder import latent_geometry
from magic_demo.train import decoder as td
from magic_demo.train import decoder_data as dd
from magic_demo.train.vae import make_batch

TEACHER = "assets/mini/t2i/vae"  # the full-width VAE (the default teacher)


def test_decoder_distillation_resumes_and_exports_a_drop_in_vae(tmp_path):
    out, exp = tmp_path / "run", tmp_path / "export"
    common = ["--out", str(out), "--teacher", TEACHER, "--export", str(exp), "--clips", "2", "--clip-frames", "3",
              "--windows", "1", "--held-windows", "1", "--batch", "4", "--channels", "4", "--blocks", "1,1,1,1", "--log-every", "1"]
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


def test_world_targets_redraw_a_blurred_recoloured_shape_where_it_is_and_keep_frames_without_one():
    for shape in world.SHAPES:
        spec = world.sample_spec(7, shape=shape, motion="moves right", background="black")
        clip = world.render_clip(spec, 5)
        # a clean clip comes back as it is: the shape is redrawn at its own place (a triangle's centroid is not
        # the centre of its box)
        assert np.abs(dd.world_targets(clip, spec).astype(int) - clip).mean() < 1.0, shape

    spec = world.sample_spec(3, shape="square", colour="yellow", motion="stays still", background="navy")
    clip = world.render_clip(spec, 3)
    made = clip.astype(np.float32)
    made[0] = made[0] * 0.7 + made[0].mean(axis=(0, 1)) * 0.3  # faded, blob-like ...
    made[0, :, :, 1] *= 0.8  # ... and shifted toward orange
    made[1, 1:6, 1:6] = (0, 255, 255)  # a stray cyan blob beside the shape
    made[2] = np.asarray(spec.bg_rgb)  # the shape lost
    made = made.round().astype(np.uint8)
    target = dd.world_targets(made, spec)
    assert np.abs(target[0].astype(int) - clip[0]).mean() < 1.0  # redrawn in the spec's shade, square
    found = world.find_shape(target[0], np.asarray(spec.bg_rgb))
    assert world.classify_shape(found["mask"]) == "square" and world.classify_colour(found["colour"]) == "yellow"
    assert np.abs(target[1].astype(int) - clip[1]).mean() < 1.0  # the blob is gone, the shape where it was
    assert np.array_equal(target[2], made[2])  # nothing to redraw: the decoded frame is kept


def test_world_targets_redraw_a_sliver_at_the_wall_as_the_whole_shape_touching_it():
    for shape in world.SHAPES:
        spec = world.sample_spec(11, shape=shape, colour="red", motion="moves left", background="black")
        lo = spec.radius
        whole = world.render_at(spec, [(lo, 0.5)])  # the shape touching the left wall, as the world bounces it
        cut = world.render_at(spec, [(0.35 * lo, 0.5)])  # pushed into the wall: about a third of it cut off
        target = dd.world_targets(cut, spec)
        assert np.abs(target.astype(int) - whole).mean() < 1.0, shape
        found = world.find_shape(target[0], np.asarray(spec.bg_rgb))
        assert world.classify_shape(found["mask"]) == shape


def test_render_at_draws_the_shape_centred_where_asked():
    spec = world.sample_spec(5, shape="circle")
    frame = world.render_at(spec, [(0.3, 0.6)])[0]
    cx, cy = world.find_shape(frame, np.asarray(spec.bg_rgb))["centroid"]
    assert abs((cx + 0.5) / 64 - 0.3) < 0.01 and abs((cy + 0.5) / 64 - 0.6) < 0.01
    assert np.array_equal(world.render_clip(spec, 4), world.render_at(spec, world.trajectory(spec, 4)))


def test_world_targets_run_fine_tunes_the_shipped_decoder_towards_rendered_pictures(tmp_path):
    out, exp = tmp_path / "run", tmp_path / "export"
    assert td.main(["--out", str(out), "--teacher", TEACHER, "--export", str(exp), "--targets", "world",
                    "--init", "assets/mini/vae", "--clips", "2", "--clip-frames", "3", "--windows", "1",
                    "--held-windows", "1", "--batch", "4", "--steps", "1", "--lr", "1e-9"]) == 1
    data = torch.load(out / "data.pt", weights_only=True)["train"]
    # encoder latents are paired with the rendered clips themselves
    x, _, _ = make_batch(range(dd.DATA_SEED, dd.DATA_SEED + 2), 3)
    rendered = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 1, 3, 4).flatten(0, 1)
    assert torch.equal(data["enc_y"], rendered)
    # denoised frames with a shape are redrawn: the targets differ from the teacher's pictures of the same latents
    teacher_frames = dd.decoder_frames(AutoencoderTiny.from_pretrained(TEACHER), data["den"])
    assert data["den_y"].shape == teacher_frames.shape and not torch.equal(data["den_y"], teacher_frames)
    # at a negligible lr the export is the initial decoder
    shipped, tuned = AutoencoderTiny.from_pretrained("assets/mini/vae"), AutoencoderTiny.from_pretrained(exp)
    for a, b in zip(shipped.decoder.state_dict().values(), tuned.decoder.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)
    assert "den_class_agree" in (out / "log.txt").read_text().split("exported")[1]
    metrics = json.loads((exp / "metrics.json").read_text())
    assert (metrics["targets"], metrics["init"], metrics["latents_from"]) == ("world", "assets/mini/vae", "mini-x8")


def test_spec_for_image_reads_shade_and_size_off_a_picture_and_takes_classes_from_the_caption():
    spec = world.sample_spec(11, shape="square", colour="orange", background="gray")
    image = world.render_first_frame(spec)
    got = dd.spec_for_image(image, world.caption(spec))
    assert (got.shape, got.colour, got.background) == ("square", "orange", "gray")
    assert abs(got.radius - spec.radius) < 0.01 and np.abs(np.subtract(got.bg_rgb, spec.bg_rgb)).max() <= 1
    assert np.abs(dd.world_targets(image[None], got)[0].astype(int) - image).mean() < 2.0  # redrawn as it was
    # the caption decides the classes: a circle captioned as a triangle is redrawn as a triangle
    circle = world.render_first_frame(world.sample_spec(11, shape="circle", colour="orange", background="gray"))
    as_triangle = dd.spec_for_image(circle, "an orange triangle stays still on a gray background")
    redrawn = dd.world_targets(circle[None], as_triangle)[0]
    assert world.classify_shape(world.find_shape(redrawn)["mask"]) == "triangle"
    assert dd.spec_for_image(np.full((64, 64, 3), 90, np.uint8), world.caption(spec)) is None  # nothing drawn


def test_chained_windows_start_like_single_windows_and_continue_from_the_last_frame():
    single, specs1 = dd.denoised_latents(1, 5)
    chained, specs2 = dd.denoised_latents(1, 5, chain=2)
    assert chained.shape == (34, 16, 8, 8) and len(specs2) == 2 and specs2[0] == specs2[1] == specs1[0]
    assert torch.equal(chained[:17], single)  # the first window is the unchained one
    assert not torch.allclose(chained[17:], chained[:17])  # the second is a new window, not a copy
