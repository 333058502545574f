import copy

import torch
from diffusers import HunyuanVideoTransformer3DModel

from magic_demo.presets import load_pipeline
from magic_demo.quantize import is_quantized, load_quantized, quantize_int8, save_quantized, weight_bytes
from magic_demo.tiny import TinyConfig, build_transformer


def transformer_inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    return dict(hidden_states=torch.randn(1, cfg.in_channels, 3, 4, 4, generator=g),
                timestep=torch.tensor([900.0]),
                encoder_hidden_states=torch.randn(1, 12, cfg.text_embed_dim, generator=g),
                encoder_attention_mask=torch.ones(1, 12, dtype=torch.long),
                pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g), return_dict=False)


def test_int8_shrinks_weights_and_stays_close():
    torch.manual_seed(0)
    model = build_transformer(TinyConfig()).eval()
    qmodel = quantize_int8(copy.deepcopy(model))
    assert is_quantized(qmodel) and not is_quantized(model)
    ratio = weight_bytes(model) / weight_bytes(qmodel)
    assert ratio >= 3.0, ratio
    with torch.inference_mode():
        ref = model(**transformer_inputs(model))[0]
        out = qmodel(**transformer_inputs(model))[0]
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.02, float(rel)  # tolerance: 2% relative L2 error of the velocity


def test_prequantized_round_trip_is_identical(tmp_path):
    torch.manual_seed(0)
    qmodel = quantize_int8(build_transformer(TinyConfig()).eval())
    save_quantized(qmodel, tmp_path / "int8")
    loaded = load_quantized(HunyuanVideoTransformer3DModel, tmp_path / "int8")
    assert is_quantized(loaded) and weight_bytes(loaded) == weight_bytes(qmodel)
    with torch.inference_mode():
        a = qmodel(**transformer_inputs(qmodel))[0]
        b = loaded(**transformer_inputs(qmodel))[0]
    assert torch.equal(a, b)


def test_int8_pipeline_quantizes_denoiser_and_text_encoders(first_frame):
    fp32 = load_pipeline("tiny-random", quantize="none")
    int8 = load_pipeline("tiny-random", quantize="int8")
    for name in ("transformer", "text_encoder", "text_encoder_2"):
        assert is_quantized(getattr(int8, name)) and not is_quantized(getattr(fp32, name))
    assert not is_quantized(int8.vae)
    a = fp32(first_frame, "a red circle", num_frames=5, steps=2, seed=0).float()
    b = int8(first_frame, "a red circle", num_frames=5, steps=2, seed=0).float()
    assert (a - b).abs().mean() < 4.0  # mean abs difference in 0..255 levels
