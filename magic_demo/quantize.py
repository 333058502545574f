"""int8 weight-only quantization with optimum-quanto, and pre-quantized save/load so start-up skips it.

Activations stay in the module's float dtype (fp32 on CPU, where bf16 is slow; bf16 on CUDA): quanto casts
the inputs of quantized linears to that dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from optimum.quanto import freeze, qint8, quantization_map, quantize, requantize
from optimum.quanto.nn import QModuleMixin
from safetensors.torch import load_file, save_file

QMAP_FILE = "quantization_map.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# Non-persistent buffers (rotary frequencies, position ids) are not in state_dict, and a model rebuilt on the meta
# device would get them uninitialised: they are stored beside the weights under this prefix.
BUFFER_PREFIX = "__buffer__."


def is_quantized(module: torch.nn.Module) -> bool:
    return any(isinstance(m, QModuleMixin) for m in module.modules())


def quantize_int8(module: torch.nn.Module) -> torch.nn.Module:
    """Quantize the weights of every Linear (and supported conv) to int8 in place, then freeze."""
    if not is_quantized(module):
        quantize(module, weights=qint8)
        freeze(module)
    return module


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the stored parameters and buffers (int8 data + scales for quantized weights)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values() if isinstance(t, torch.Tensor))


def save_quantized(model, out_dir: str | Path) -> Path:
    """Save a quantized diffusers/transformers model: its config, int8 safetensors and the quantization map."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not is_quantized(model):
        raise ValueError("model is not quantized; call quantize_int8 first")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state.update({BUFFER_PREFIX + k: b.contiguous() for k, b in model.named_buffers() if k not in state})
    save_file(state, out / WEIGHTS_FILE)
    (out / QMAP_FILE).write_text(json.dumps(quantization_map(model), indent=1))
    if hasattr(model, "save_config"):  # diffusers
        model.save_config(out)
    else:  # transformers
        model.config.to_json_file(out / CONFIG_FILE)
    return out


def load_quantized(model_cls, in_dir: str | Path, device: str | torch.device = "cpu"):
    """Rebuild `model_cls` from the saved config on the meta device and load the int8 weights (no re-quantize)."""
    src = Path(in_dir)
    for name in (WEIGHTS_FILE, QMAP_FILE, CONFIG_FILE):
        if not (src / name).is_file():
            raise FileNotFoundError(f"pre-quantized model folder {src} lacks {name}")
    with torch.device("meta"):
        if hasattr(model_cls, "from_config"):
            model = model_cls.from_config(model_cls.load_config(src))
        else:
            model = model_cls(model_cls.config_class.from_json_file(src / CONFIG_FILE))
    state = load_file(src / WEIGHTS_FILE)
    buffers = {k[len(BUFFER_PREFIX):]: state.pop(k) for k in list(state) if k.startswith(BUFFER_PREFIX)}
    requantize(model, state, json.loads((src / QMAP_FILE).read_text()), device=device)
    for name, tensor in buffers.items():
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner).register_buffer(attr, tensor.to(device), persistent=False)
    return model.eval()
