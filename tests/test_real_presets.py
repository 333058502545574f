"""GPU presets, tested offline on CPU with tiny models written in the exact on-disk layouts."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

import magic_demo.quantize as quantize_module
from magic_demo.convert import diffusers_to_original
from magic_demo.memory import estimate_preset_memory
from magic_demo.pipeline import MagicI2VPipeline
from magic_demo.presets import (HUNYUAN_I2V_TEMPLATE, Preset, check_compatible, load_pipeline, resolve_folder,
                                save_components, save_prequantized)
from magic_demo.quantize import is_quantized, weight_bytes
from magic_demo.tiny import TinyConfig, build_tiny_components

ROOT = Path(__file__).resolve().parent.parent
IMAGE = Image.fromarray(np.tile(np.arange(32, dtype=np.uint8)[:, None, None] * 8, (1, 32, 3)))
LAYOUT = {"transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "image_processor",
          "scheduler"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("hunyuan-layout")
    save_components(build_tiny_components(seed=0), root)
    return root


def folder_preset(root, **kw):
    return Preset("test-folder", "tiny model in the real layout", path=root, width=32, height=32, buckets=((32, 32),),
                  window_frames=9, **kw)


def test_real_layout_loads_offline_and_matches_the_in_memory_model(folder):
    assert {p.name for p in folder.iterdir()} == LAYOUT
    loaded = load_pipeline(folder_preset(folder, offload=True, vae_tiling=True), quantize="none")
    built = MagicI2VPipeline(**build_tiny_components(seed=0))
    a = loaded(IMAGE, "a red circle moves left", num_frames=5, steps=2, seed=0)
    b = built(IMAGE, "a red circle moves left", num_frames=5, steps=2, seed=0)
    assert torch.equal(a, b)


def test_hub_ids_never_download_in_tests(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="cannot get someone/not-cached-model from the Hugging Face hub"):
        resolve_folder("someone/not-cached-model")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_folder("/no/such/folder")


def test_prequantized_folder_loads_without_quantizing(folder, tmp_path):
    out = save_prequantized(folder_preset(folder), tmp_path / "int8")
    assert {"transformer_int8", "text_encoder_int8", "text_encoder_2_int8"} <= {p.name for p in out.iterdir()}
    assert not (out / "transformer").exists()
    with mock.patch.object(quantize_module, "quantize", wraps=quantize_module.quantize) as spy:
        pre = load_pipeline(folder_preset(out), quantize="int8")
        assert spy.call_count == 0  # loaded as int8, not re-quantized
        fresh = load_pipeline(folder_preset(folder), quantize="int8")
        assert spy.call_count == 3  # transformer + both text encoders quantized at start-up
    for name in ("transformer", "text_encoder", "text_encoder_2"):
        assert is_quantized(getattr(pre, name))
        assert weight_bytes(getattr(pre, name)) == weight_bytes(getattr(fresh, name))
    a = pre(IMAGE, "a red circle", num_frames=5, steps=2, seed=1)
    b = fresh(IMAGE, "a red circle", num_frames=5, steps=2, seed=1)
    assert torch.equal(a, b)


@pytest.mark.parametrize("cfg", [TinyConfig(), TinyConfig(heads=8, head_dim=64, rope_axes_dim=(16, 24, 24),
                                                          double_layers=4, single_layers=4, text_hidden=256,
                                                          clip_hidden=128, latent_channels=16)])
@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_memory_estimate_within_25_percent_of_measured(tmp_path, cfg, quantize):
    comps = build_tiny_components(seed=0, cfg=cfg)
    save_components(comps, tmp_path)
    estimate = estimate_preset_memory(tmp_path, torch.float32, quantize)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        module = comps[name]
        if quantize == "int8" and name != "vae":
            module = quantize_module.quantize_int8(module)
        measured = weight_bytes(module)
        assert abs(estimate.weights[name] - measured) <= 0.25 * measured, (name, estimate.weights[name], measured)


def test_offload_estimate_never_holds_encoders_and_transformer_together(folder):
    on = estimate_preset_memory(folder, torch.float32, "none", offload=True, tokens=64)
    off = estimate_preset_memory(folder, torch.float32, "none", offload=False, tokens=64)
    w = on.weights
    assert off.peak == sum(w.values()) + off.activations
    assert on.peak == max(w["transformer"] + w["vae"], w["text_encoder"] + w["text_encoder_2"]) + on.activations
    assert on.activations > 0 and "GiB" in on.describe()


def test_one_llama_is_shared_by_text_and_image_tokens():
    pipe = MagicI2VPipeline(**build_tiny_components(seed=0))
    llamas = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)
              for m in m.modules() if type(m).__name__ == "LlamaModel"]
    assert len(llamas) == 1  # the LLaVA's language model is the text encoder; no second copy


def test_incompatible_transformer_is_refused():
    comps = build_tiny_components(seed=0, cfg=TinyConfig(latent_channels=8))
    comps["vae"] = build_tiny_components(seed=0)["vae"]  # 4 latent channels: 2C+1 = 9, transformer has 17
    with pytest.raises(ValueError, match="2C\\+1 = 9"):
        check_compatible(comps)


def test_hunyuan_template_crops_to_prompt_and_keeps_every_4th_image_token():
    comps = build_tiny_components(seed=0)
    # the tiny CLIP text model has 64 positions; the real one 77
    pipe = MagicI2VPipeline(**comps, prompt_template=dataclasses.replace(HUNYUAN_I2V_TEMPLATE, clip_max_tokens=32))
    emb = pipe.encode_prompt("a red circle moves left", IMAGE)
    n_image = comps["text_encoder"].config.image_seq_length // 4
    closing = len(comps["tokenizer"]("<|eot_id|>", add_special_tokens=False).input_ids) + 1  # template end + </s>
    assert int(emb.mask[0, n_image:].sum()) == 5 + closing  # the five words, nothing of the system text
    assert emb.embeds.shape[1] == n_image + 5 + closing and emb.mask.all()  # padding up to 256 tokens dropped


def test_convert_and_quantize_commands(tmp_path):
    comps = build_tiny_components(seed=0)
    original, _ = diffusers_to_original(comps["transformer"].state_dict())
    torch.save(original, tmp_path / "magic141.pth")
    (tmp_path / "config.json").write_text(json.dumps(dict(comps["transformer"].config)))
    run = lambda *a: subprocess.run([sys.executable, "-m", "magic_demo", *a], cwd=ROOT, capture_output=True, text=True,
                                    timeout=300)
    done = run("convert", "--from", "magic141", str(tmp_path / "magic141.pth"), "--out", str(tmp_path / "conv"),
               "--config", str(tmp_path / "config.json"), "--dtype", "fp32")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["missing"] == []
    assert (tmp_path / "conv" / "diffusion_pytorch_model.safetensors").is_file()
    done = run("quantize", "--preset", "tiny-random", "--out", str(tmp_path / "q"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "q" / "transformer_int8" / "quantization_map.json").is_file()
    done = run("convert", "--from", "magic141", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "x"))
    assert done.returncode == 2 and "does not exist" in done.stderr
