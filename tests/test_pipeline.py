import numpy as np
import pytest
import torch
from PIL import Image

from magic_demo.tiny import TinyConfig, build_tiny_components
from magic_demo.pipeline import MagicI2VPipeline


def test_condition_is_image_latent_in_frame0_plus_mask(tiny_pipe, first_frame):
    latent = tiny_pipe.encode_image(first_frame)
    c = tiny_pipe.geometry.channels
    assert latent.shape == (1, c, 1, 32 // 8, 32 // 8)
    cond = tiny_pipe.prepare_condition(latent, 3)
    assert cond.shape == (1, c + 1, 3, 4, 4)  # with the noisy latent: 2C+1 transformer inputs
    assert tiny_pipe.transformer.config.in_channels == 2 * c + 1
    assert torch.equal(cond[:, :c, 0], latent[:, :, 0])
    assert (cond[:, :c, 1:] == 0).all()
    assert (cond[:, c, 0] == 1).all() and (cond[:, c, 1:] == 0).all()


def test_prompt_embeds_prepend_image_tokens(tiny_pipe, first_frame):
    tpl = tiny_pipe.prompt_template
    emb = tiny_pipe.encode_prompt("a red circle moves left on a black background", first_frame)
    n_image = tiny_pipe.text_encoder.config.image_seq_length // tpl.image_token_stride
    n_words = 9 + 1  # nine words + end token; the padding up to max_prompt_tokens is dropped
    assert emb.embeds.shape == (1, n_image + n_words, tiny_pipe.text_encoder.config.text_config.hidden_size)
    assert emb.mask.all()  # image tokens always attended, and no padding left
    assert emb.pooled.shape == (1, tiny_pipe.text_encoder_2.config.hidden_size)
    # the image tokens depend on the image, the text tokens on the prompt
    other = tiny_pipe.encode_prompt("a red circle moves left on a black background", first_frame.rotate(90))
    assert not torch.allclose(emb.embeds[:, :n_image], other.embeds[:, :n_image])


def test_dropping_the_padding_changes_nothing_but_the_length(tiny_pipe, first_frame):
    from dataclasses import replace

    emb = tiny_pipe.encode_prompt(["a red circle moves left on a black background", "a cat"], [first_frame] * 2)
    assert emb.mask[0].all() and int(emb.mask[1].sum()) < emb.mask.shape[1]  # trimmed to the longer prompt
    one = emb.select(0)
    n, dim = one.embeds.shape[1], one.embeds.shape[2]
    padded = replace(one, embeds=torch.cat([one.embeds, torch.randn(1, 20, dim)], 1),
                     mask=torch.cat([one.mask, one.mask.new_zeros(1, 20)], 1))
    cond = tiny_pipe.prepare_condition(tiny_pipe.encode_image(first_frame), 3)
    a = tiny_pipe.denoise(cond, one, 2, torch.Generator().manual_seed(0))
    b = tiny_pipe.denoise(cond, padded, 2, torch.Generator().manual_seed(0))
    assert n < padded.embeds.shape[1] and torch.allclose(a, b, atol=1e-4)


def test_negative_prompt_shares_one_encoder_call(tiny_pipe, first_frame):
    before = tiny_pipe.calls["text_encoder"]
    emb = tiny_pipe.encode_prompt("a red circle", first_frame, negative_prompt="")
    assert tiny_pipe.calls["text_encoder"] == before + 1
    assert emb.embeds.shape[0] == 2 and emb.select(1).embeds.shape[0] == 1


def test_one_clip_shape_and_calls(tiny_pipe, first_frame):
    before = tiny_pipe.calls.copy()
    frames = tiny_pipe(first_frame, "a red circle moves left", num_frames=9, steps=3, seed=0)
    assert frames.shape == (9, 32, 32, 3) and frames.dtype == torch.uint8
    delta = tiny_pipe.calls - before
    assert delta["transformer"] == 3 and delta["text_encoder"] == 1


def test_colour_anchor_maps_each_frame_onto_the_images_palette(tiny_pipe, first_frame):
    from magic_demo.windows import match_colours

    raw = tiny_pipe(first_frame, "a red circle", num_frames=5, steps=2, seed=0, colour_anchor=False).numpy()
    anchored = tiny_pipe(first_frame, "a red circle", num_frames=5, steps=2, seed=0).numpy()  # on by default
    reference = np.asarray(first_frame)
    assert np.array_equal(anchored, np.stack([match_colours(f, reference) for f in raw]))
    for c in range(3):  # only values the first frame has, per channel; the random model's raw frames have others
        assert set(np.unique(anchored[..., c])) <= set(np.unique(reference[..., c]))
        assert not set(np.unique(raw[..., c])) <= set(np.unique(reference[..., c]))


def test_classic_cfg_only_when_asked(tiny_pipe, first_frame):
    before = tiny_pipe.calls["transformer"]
    tiny_pipe(first_frame, "a red circle", num_frames=5, steps=2, seed=0, true_cfg_scale=4.0)
    assert tiny_pipe.calls["transformer"] - before == 4


def test_guidance_input_reaches_a_cfg_distilled_transformer(first_frame):
    comps = build_tiny_components(seed=0, cfg=TinyConfig(guidance_embeds=True))
    pipe = MagicI2VPipeline(**comps)
    assert pipe.has_guidance_input
    a = pipe(first_frame, "a red circle", num_frames=5, steps=2, seed=0, guidance_scale=1.0)
    b = pipe(first_frame, "a red circle", num_frames=5, steps=2, seed=0, guidance_scale=6.0)
    assert pipe.calls["transformer"] == 4  # still one forward per step
    assert not torch.equal(a, b)


def test_image_guidance_extrapolates_from_the_image_free_velocity(tiny_pipe, first_frame):
    """One Euler step from sigma 1 to 0: x = noise - v, with v = v_free + s (v_image - v_free), v_free the velocity
    with a zero latent condition and the prompt encoded beside the neutral image."""
    from magic_demo.pipeline import neutral_image

    prompt = "a red circle moves left"
    embeds = tiny_pipe.encode_prompt(prompt, first_frame)
    imageless = tiny_pipe.encode_prompt(prompt, neutral_image(first_frame.size))
    cond = tiny_pipe.prepare_condition(tiny_pipe.encode_image(first_frame), 3)
    before = tiny_pipe.calls["transformer"]
    out = tiny_pipe.denoise(cond, embeds, 1, torch.Generator().manual_seed(0), image_guidance_scale=2.5,
                            imageless=imageless)
    assert tiny_pipe.calls["transformer"] - before == 2  # one more forward per step
    noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))

    def v(e, c):
        return tiny_pipe.transformer(hidden_states=torch.cat([noise, c], 1), timestep=torch.tensor([1000.0]),
                                     encoder_hidden_states=e.embeds, encoder_attention_mask=e.mask,
                                     pooled_projections=e.pooled, return_dict=False)[0]

    with torch.inference_mode():
        v_image, v_free = v(embeds, cond), v(imageless, torch.zeros_like(cond))
    assert not torch.allclose(v_image, v_free, atol=1e-3)  # the first frame matters to the velocity
    assert torch.allclose(out, noise - (v_free + 2.5 * (v_image - v_free)), atol=1e-5)


def test_image_guidance_of_one_is_off(tiny_pipe, first_frame):
    before = tiny_pipe.calls.copy()
    a = tiny_pipe(first_frame, "a red circle", num_frames=5, steps=2, seed=0)
    b = tiny_pipe(first_frame, "a red circle", num_frames=5, steps=2, seed=0, image_guidance_scale=1.0)
    assert torch.equal(a, b) and (tiny_pipe.calls - before)["transformer"] == 4
    c = tiny_pipe(first_frame, "a red circle", num_frames=5, steps=2, seed=0, image_guidance_scale=2.0)
    assert (tiny_pipe.calls - before)["transformer"] == 4 + 4 and not torch.equal(a, c)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_non_rgb_images_are_refused(tiny_pipe, first_frame, mode):
    with pytest.raises(ValueError, match="image must be RGB"):
        tiny_pipe(first_frame.convert(mode), "x", num_frames=5, steps=1)


@pytest.mark.parametrize("size", [(30, 32), (32, 40)])
def test_size_must_be_multiple_of_16(tiny_pipe, size):
    img = Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8))
    with pytest.raises(ValueError, match="(height|width) must be a positive multiple of 16"):
        tiny_pipe(img, "x", num_frames=5, steps=1)


@pytest.mark.parametrize("kwargs,match", [(dict(num_frames=6), "num_frames"), (dict(num_frames=5, steps=0), "steps"),
                                          (dict(num_frames=5, steps=65), "steps")])
def test_bad_clip_arguments(tiny_pipe, first_frame, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_pipe(first_frame, "x", **kwargs)


def test_compiled_transformer_gives_the_eager_frames(first_frame):
    """load_pipeline(compile=True) (int8 weights, torch.compile): same clip as eager within 1 level."""
    from magic_demo.presets import load_pipeline

    eager, compiled = load_pipeline("tiny-random"), load_pipeline("tiny-random", compile=True)
    a = eager(first_frame, "a red circle moves left", num_frames=5, steps=2, seed=0)
    b = compiled(first_frame, "a red circle moves left", num_frames=5, steps=2, seed=0)
    assert compiled.transformer._compiled_call_impl is not None and eager.transformer._compiled_call_impl is None
    assert (a.int() - b.int()).abs().max() <= 1
