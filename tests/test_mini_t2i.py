"""Mini text-to-image first-frame model: trainer (resume, export), pipeline loading, generation, input checks."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from magic_demo.first_frame import FirstFrame
from magic_demo.text_to_image import TextToImage
from magic_demo.mini_t2i import (DEFAULT_PATH, HELDOUT_SET, MiniT2IPipeline, evaluate_t2i, heldout_captions,
                                 load_mini_t2i, load_mini_text_to_image)
from magic_demo.train import t2i as trainer

PROMPT = "a red circle moves left on a black background"
TINY = dict(config="tiny", batch=2, eval_n=2, eval_steps=(2,), eval_guidance=(2.0,), threads=1, minutes=5.0,
            log=lambda msg: None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    out, export = root / "run", root / "export"
    first = trainer.train(out=out, max_steps=3, export_dir=export, **TINY)
    second = trainer.train(out=out, max_steps=5, export_dir=export, **TINY)
    return {"out": out, "export": export, "first": first, "second": second}


def test_checkpoint_resume_continues_step_count(trained):
    assert trained["first"]["state"]["step"] == 3
    assert trained["second"]["state"]["step"] == 5
    ck = torch.load(trained["out"] / trainer.CHECKPOINT, map_location="cpu", weights_only=False)
    assert ck["state"]["step"] == 5
    assert [e["step"] for e in ck["state"]["evals"]] == [3, 5]
    assert np.isfinite(trained["second"]["last_loss"])


def test_export_is_safetensors_and_loads_back(trained):
    export = trained["export"]
    assert (export / "model_index.json").is_file()
    assert list(export.glob("transformer/*.safetensors")) and list(export.glob("text_encoder/*.safetensors"))
    assert not list(export.rglob("*.bin"))
    state = json.loads((export / "train_state.json").read_text())
    assert state["step"] in (3, 5) and set(state["accuracy"]) >= {"colour", "shape", "background"}
    pipe = load_mini_t2i(export)
    assert isinstance(pipe, MiniT2IPipeline)
    ema = trained["second"]["ema"] if state["step"] == 5 else None
    if ema is not None:  # exported weights are the EMA weights
        for (k, a), b in zip(ema.transformer.state_dict().items(), pipe.transformer.state_dict().values()):
            assert torch.equal(a, b), k


def test_generate_through_text_to_image_snapped_to_bucket(trained):
    pipe = load_mini_t2i(trained["export"])
    t2i = TextToImage(pipe, num_inference_steps=2, guidance_scale=2.0)
    frame = t2i.generate(PROMPT, seed=3, bucket=(64, 64))
    assert isinstance(frame, FirstFrame) and frame.source == "generated"
    assert frame.image.size == (64, 64) and frame.image.mode == "RGB"
    again = t2i.generate(PROMPT, seed=3, bucket=(64, 64))
    assert np.array_equal(np.asarray(frame.image), np.asarray(again.image))  # deterministic by seed
    wide = load_mini_text_to_image(trained["export"]).generate(PROMPT, seed=3, bucket=(96, 64))
    assert wide.image.size == (96, 64) and wide.provenance["generated_size"] == [64, 64]


@pytest.mark.parametrize("kwargs, name", [
    (dict(prompt=None), "prompt"),
    (dict(prompt=""), "prompt"),
    (dict(prompt=[PROMPT, 3]), "prompt"),
    (dict(height=30), "height"),
    (dict(width=0), "width"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt"),
    (dict(output_type="bmp"), "output_type"),
    (dict(negative_prompt=["x", "y"]), "negative_prompt"),
    (dict(latents=torch.zeros(1, 3, 8, 8)), "latents"),
])
def test_bad_inputs_raise_value_errors_naming_the_argument(trained, kwargs, name):
    pipe = load_mini_t2i(trained["export"])
    call = {"prompt": PROMPT, "num_inference_steps": 1, **kwargs}
    with pytest.raises(ValueError, match=name):
        pipe(**call)


def test_evaluate_and_heldout_captions(trained):
    pipe = load_mini_t2i(trained["export"])
    with pytest.raises(ValueError, match="n"):
        evaluate_t2i(pipe, n=0)
    r = evaluate_t2i(pipe, n=3, seed=0, num_inference_steps=1, guidance_scale=1.0)
    assert r["n"] == 3 and len(r["rows"]) == 3
    assert all(0.0 <= r[k] <= 1.0 for k in ("colour", "shape", "background", "colour_and_shape"))
    caps = heldout_captions()
    assert len(set(caps)) == len(caps) == 64 and heldout_captions(5) == caps[:5]
    for step in range(3):  # the trainer never sees a held-out caption
        x, m, batch_caps = trainer.make_batch(step, 16, drop=0.0)
        assert x.shape == (16, 3, 64, 64) and float(x.min()) >= -1 and float(x.max()) <= 1
        assert not set(batch_caps) & HELDOUT_SET


@pytest.mark.skipif(not (Path(DEFAULT_PATH) / "model_index.json").is_file(), reason="no shipped mini T2I weights")
def test_shipped_model_draws_the_caption():
    t2i = load_mini_text_to_image()
    frame = t2i.generate(PROMPT, seed=0, bucket=(64, 64))
    assert frame.image.size == (64, 64)
    r = evaluate_t2i(t2i.pipe, n=16, seed=1, num_inference_steps=t2i.num_inference_steps,
                     guidance_scale=t2i.guidance_scale)
    # measured on 2 x 100 held-out captions (TRAINING.md): colour 88-89%, shape 66-71%, background 100%
    assert r["colour"] >= 0.75 and r["background"] >= 0.75 and r["shape"] >= 0.45, r["rows"]
    assert t2i.pipe.vae is not None  # the shipped model draws in the world VAE's latent space


def test_unet_denoiser_variant_trains_exports_and_generates(tmp_path):
    cfg = {"arch": "unet", "channels": (8, 16), "text_hidden": 16, "text_layers": 1, "norm_groups": 4,
           "unet_head_dim": 8}
    r = trainer.train(out=tmp_path / "run", max_steps=2, export_dir=tmp_path / "export",
                      **{**TINY, "config": cfg})
    assert r["state"]["step"] == 2
    pipe = load_mini_t2i(tmp_path / "export")
    assert pipe.unet is not None and pipe.transformer is None
    frame = TextToImage(pipe, num_inference_steps=2, guidance_scale=2.0).generate(PROMPT, seed=0, bucket=(64, 64))
    assert frame.image.size == (64, 64) and frame.image.mode == "RGB"
    with pytest.raises(ValueError, match="height"):
        pipe(PROMPT, height=61)  # not a multiple of the UNet's total downsampling (2)


def test_unknown_arch_is_refused():
    from magic_demo.mini_t2i import build_mini_t2i

    with pytest.raises(ValueError, match="arch"):
        build_mini_t2i({"arch": "gan"})


def test_latent_variant_trains_on_vae_latents_and_decodes_rgb(tmp_path):
    from tests.test_train_i2v import tiny_vae_folder

    vae = tiny_vae_folder(tmp_path / "vae")
    cfg = {"arch": "pixart", "heads": 2, "head_dim": 8, "layers": 1, "patch": 1, "text_hidden": 16,
           "text_layers": 1, "vae": str(vae)}
    r = trainer.train(out=tmp_path / "run", max_steps=2, export_dir=tmp_path / "export", **{**TINY, "config": cfg})
    assert r["state"]["step"] == 2 and np.isfinite(r["last_loss"])
    pipe = load_mini_t2i(tmp_path / "export")
    assert pipe.vae is not None and list((tmp_path / "export" / "vae").glob("*.safetensors"))
    assert pipe.vae_scale_factor == 8 and pipe.default_size == 64 and pipe.patch_size == 8
    assert pipe.transformer.config.in_channels == 4 and pipe.transformer.config.sample_size == 8
    assert pipe.sample_shape(2, 64, 48) == (2, 4, 8, 6)
    seen = []
    out = pipe(PROMPT, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0),
               callback_on_step_end=lambda p, i, t, kw: seen.append(tuple(kw["latents"].shape)))
    assert seen == [(1, 4, 8, 8)] * 2  # the denoiser runs on latents ...
    assert out.images.shape == (1, 64, 64, 3) and 0.0 <= out.images.min() <= out.images.max() <= 1.0  # ... RGB out
    with pytest.raises(ValueError, match="latents"):
        pipe(PROMPT, num_inference_steps=1, latents=torch.zeros(1, 3, 64, 64))  # pixel-shaped noise is refused
    with pytest.raises(ValueError, match="height"):
        pipe(PROMPT, height=60)  # not a whole number of latent pixels
    frame = TextToImage(pipe, num_inference_steps=1, guidance_scale=2.0).generate(PROMPT, seed=0, bucket=(96, 64))
    assert frame.image.size == (96, 64)


def test_a_model_for_a_new_vae_starts_from_another_models_blocks(tmp_path):
    from diffusers import AutoencoderTiny

    from tests.test_train_i2v import tiny_vae_folder

    cfg = {"arch": "pixart", "heads": 2, "head_dim": 8, "layers": 1, "patch": 1, "text_hidden": 16,
           "text_layers": 1, "vae": str(tiny_vae_folder(tmp_path / "vae"))}
    trainer.train(out=tmp_path / "run", max_steps=1, export_dir=tmp_path / "export", **{**TINY, "config": cfg})
    torch.manual_seed(1)  # the new VAE: x4 spatial (16 x 16 latents at 64 px), other latent channels
    AutoencoderTiny(encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8), latent_channels=8,
                    num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1)).save_pretrained(tmp_path / "vae_x4")
    cfg_x4 = {**cfg, "patch": 2, "vae": str(tmp_path / "vae_x4")}
    logs = []
    r = trainer.train(out=tmp_path / "x4", max_steps=1, lr=1e-12, init_blocks=tmp_path / "export",
                      **{**TINY, "config": cfg_x4, "log": logs.append})
    assert any("fresh: pos_embed.proj.weight, proj_out.weight, proj_out.bias;" in m for m in logs)
    old, new = load_mini_t2i(tmp_path / "export"), r["pipe"]
    block = "transformer_blocks.0.attn1.to_q.weight"
    assert torch.allclose(old.transformer.state_dict()[block], new.transformer.state_dict()[block], atol=1e-6)
    assert torch.allclose(old.text_encoder.get_input_embeddings().weight,
                          new.text_encoder.get_input_embeddings().weight, atol=1e-6)
    assert new.transformer.config.in_channels == 8 and new.sample_shape(1, 64, 64) == (1, 8, 16, 16)
    with pytest.raises(ValueError, match="`init` and `init_blocks` exclude each other"):
        trainer.train(out=tmp_path / "y", max_steps=1, init=tmp_path / "export", init_blocks=tmp_path / "export",
                      **{**TINY, "config": cfg_x4})


def test_world_tuning_samples_as_the_pipeline_does_and_trains_the_denoiser(tmp_path):
    from magic_demo.distill.world_tune import t2i_samples_with_grad, t2i_world_tune_loss
    from tests.test_train_i2v import tiny_vae_folder

    vae = tiny_vae_folder(tmp_path / "vae")
    cfg = {"arch": "pixart", "heads": 2, "head_dim": 8, "layers": 1, "patch": 1, "text_hidden": 16,
           "text_layers": 1, "vae": str(vae)}
    trainer.train(out=tmp_path / "run", max_steps=1, export_dir=tmp_path / "export", **{**TINY, "config": cfg})
    pipe = load_mini_t2i(tmp_path / "export")
    captions = [PROMPT, "a blue square stays still on a gray background"]
    frames = t2i_samples_with_grad(pipe, captions, 3, 2.0, torch.Generator().manual_seed(4))
    images = pipe(captions, num_inference_steps=3, guidance_scale=2.0, output_type="pt",
                  generator=torch.Generator().manual_seed(4)).images
    assert frames.requires_grad and frames.shape == (2, 3, 1, 64, 64)
    assert torch.allclose((frames.detach()[:, :, 0] + 1) / 2, images, atol=1e-5)
    # on the shipped model (which draws shapes) the loss redraws its samples and reaches the denoiser only
    shipped = load_mini_t2i(DEFAULT_PATH)
    shipped.vae.requires_grad_(False)
    loss, logs = t2i_world_tune_loss(shipped, captions, 8, 4.0, torch.Generator().manual_seed(4))
    assert set(logs) == {"loss_world", "redrawn", "wrong"} and logs["redrawn"] == 1.0 and logs["loss_world"] > 0
    assert logs["wrong"].shape == (2,) and ((logs["wrong"] == 0) | (logs["wrong"] == 1)).all()  # one frame each
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in shipped.denoiser.parameters())
    assert all(p.grad is None for p in shipped.vae.parameters())
    # the trainer adds it: one step from the exported model, its own decoder, the world loss on
    r = trainer.train(out=tmp_path / "tuned", max_steps=2, export_dir=tmp_path / "tuned_export", init=tmp_path / "export",
                      world_weight=1.0, world_batch=2, world_steps=2, **{**TINY, "config": cfg})
    assert r["state"]["step"] == 2 and np.isfinite(r["last_loss"])
    # with the failure focus its captions are drawn apart from the flow batch's, counted by group, and resumed
    r = trainer.train(out=tmp_path / "focus", max_steps=3, init=tmp_path / "export", world_weight=1.0, world_batch=2,
                      world_steps=2, world_focus=True, **{**TINY, "config": cfg})  # steps 2 and 3 (the export's is 1)
    seen = r["state"]["focus"]["seen"]
    assert sum(seen.values()) == pytest.approx(2 * 0.99 + 2)  # two steps of two captions, the first decayed once
    r = trainer.train(out=tmp_path / "focus", max_steps=4, init=tmp_path / "export", world_weight=1.0, world_batch=2,
                      world_steps=2, world_focus=True, **{**TINY, "config": cfg})
    assert sum(r["state"]["focus"]["seen"].values()) == pytest.approx((2 * 0.99 + 2) * 0.99 + 2)
    # --decoder-lr trains the model's own decoder with that loss too; the encoder (the latent space) stays as it was
    # (from the shipped model: a random one draws no shapes, so its world loss is 0)
    steps = json.loads((Path(DEFAULT_PATH) / "train_state.json").read_text())["step"]
    trainer.train(out=tmp_path / "dec", max_steps=steps + 1, export_dir=tmp_path / "dec_export", init=DEFAULT_PATH,
                  world_weight=1.0, world_batch=2, world_steps=2, decoder_lr=1e-3, **{**TINY, "config": "latent"})
    before, after = load_mini_t2i(DEFAULT_PATH).vae, load_mini_t2i(tmp_path / "dec_export").vae
    assert any(not torch.equal(p, q) for p, q in zip(before.decoder.parameters(), after.decoder.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(before.encoder.parameters(), after.encoder.parameters()))
    with pytest.raises(ValueError, match="`decoder_lr` needs a latent model and the world-target loss"):
        trainer.train(out=tmp_path / "x", max_steps=1, decoder_lr=1e-3, **{**TINY, "config": cfg})
