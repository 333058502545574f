import pytest
import torch
from diffusers import HunyuanVideoTransformer3DModel

from magic_demo.convert import (MAGIC141_CONFIG, ConversionError, convert_transformer, diffusers_to_original,
                                original_to_diffusers, read_checkpoint)
from magic_demo.tiny import TinyConfig, build_transformer


def tiny_original(tmp_path=None):
    torch.manual_seed(0)
    model = build_transformer(TinyConfig(double_layers=2, single_layers=2, refiner_layers=2)).eval()
    original, unknown = diffusers_to_original(model.state_dict())
    assert unknown == []
    return model, original


def test_original_layout_is_fused_and_swapped():
    model, original = tiny_original()
    hidden = model.config.num_attention_heads * model.config.attention_head_dim
    assert original["double_blocks.0.img_attn_qkv.weight"].shape == (3 * hidden, hidden)
    assert original["single_blocks.1.linear1.weight"].shape[0] == 3 * hidden + int(hidden * 2.0)
    sd = model.state_dict()
    scale, shift = sd["norm_out.linear.weight"].chunk(2)
    assert torch.equal(original["final_layer.adaLN_modulation.1.weight"], torch.cat([shift, scale]))
    assert not any(k.startswith(("transformer_blocks", "x_embedder")) for k in original)


def test_round_trip_gives_identical_outputs(tmp_path):
    model, original = tiny_original()
    path = tmp_path / "magic141.pth"
    torch.save({"module": original}, path)
    converted, report = convert_transformer(read_checkpoint(path), dict(model.config))
    assert report == {"missing": [], "unexpected": []}
    g = torch.Generator().manual_seed(1)
    cfg = model.config
    inputs = dict(hidden_states=torch.randn(1, cfg.in_channels, 2, 4, 4, generator=g), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 6, cfg.text_embed_dim, generator=g),
                  encoder_attention_mask=torch.ones(1, 6, dtype=torch.long),
                  pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g), return_dict=False)
    with torch.inference_mode():
        assert torch.equal(model(**inputs)[0], converted(**inputs)[0])


def test_missing_and_extra_keys_are_named():
    model, original = tiny_original()
    broken = dict(original)
    del broken["double_blocks.1.txt_mlp.fc2.weight"]
    broken["double_blocks.0.img_lora.weight"] = torch.zeros(2)
    with pytest.raises(ConversionError) as err:
        convert_transformer(broken, dict(model.config))
    assert "transformer_blocks.1.ff_context.net.2.weight" in str(err.value)
    assert "double_blocks.0.img_lora.weight" in str(err.value)
    partial, report = convert_transformer(broken, dict(model.config), allow_partial=True)
    assert report["missing"] == ["transformer_blocks.1.ff_context.net.2.weight"]
    assert not any(p.is_meta for p in partial.parameters())


def test_rules_cover_the_full_size_magic141_model():
    # The real 13B layout on the meta device: every diffusers key maps to an original one and back.
    with torch.device("meta"):
        real = HunyuanVideoTransformer3DModel(**MAGIC141_CONFIG)
    state = real.state_dict()
    original, unknown = diffusers_to_original(state)
    assert unknown == []
    assert "single_blocks.39.linear1.weight" in original and "double_blocks.19.txt_attn_qkv.weight" in original
    back, unknown = original_to_diffusers(original, hidden_size=3072)
    assert unknown == [] and set(back) == set(state)


def test_checkpoint_that_is_not_tensors_is_refused(tmp_path):
    path = tmp_path / "bad.pth"
    torch.save({"epoch": 3, "note": "no weights"}, path)
    with pytest.raises(ConversionError, match="flat dict of tensors"):
        read_checkpoint(path)
