"""Peak-memory estimate for a preset, computed from configs alone (models built on the meta device), so a
GPU user learns before loading whether the preset fits, and gets a clear error instead of an OOM crash."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

MODEL_COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")
QUANTIZED = ("transformer", "text_encoder", "text_encoder_2")


class InsufficientMemoryError(RuntimeError):
    """The estimated peak exceeds the device's free memory."""


@dataclass
class MemoryEstimate:
    weights: dict  # component -> bytes
    activations: int  # transformer working memory for one window (heuristic, see estimate_activations)
    offload: bool  # encoders moved to CPU while the transformer runs

    @property
    def peak(self) -> int:
        resident = self.weights.get("transformer", 0) + self.weights.get("vae", 0)
        encoders = self.weights.get("text_encoder", 0) + self.weights.get("text_encoder_2", 0)
        # With offload the encoders and the transformer are never on the device together.
        return (max(resident, encoders) if self.offload else resident + encoders) + self.activations

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in self.weights.items())
        return f"estimated peak {self.peak / 2**30:.2f} GiB ({parts}; activations {self.activations / 2**30:.2f} GiB)"


def _meta_model(name: str, config: dict) -> torch.nn.Module:
    import diffusers
    import transformers

    cls_name = config.get("_class_name") or (config.get("architectures") or [None])[0]
    with torch.device("meta"):
        if hasattr(diffusers, cls_name or ""):
            cls = getattr(diffusers, cls_name)
            return cls.from_config(config)
        cls = getattr(transformers, cls_name)
        return cls(transformers.AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"}))


def component_bytes(model: torch.nn.Module, dtype_bytes: int, int8: bool) -> int:
    """Bytes of parameters and buffers; int8 (quanto qint8 weights): Linear and Conv2d weights take 1 byte each plus
    one fp32 scale per output channel."""
    total = 0
    for module in model.modules():
        for pname, p in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if int8 and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and pname == "weight":
                total += p.numel() + 4 * p.shape[0]
            else:
                total += p.numel() * dtype_bytes
    return total


def estimate_activations(transformer_config: dict, tokens: int, dtype_bytes: int) -> int:
    """One forward without gradients, SDPA attention: a few token x hidden (and MLP-wide) buffers live at once."""
    hidden = transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"]
    mlp = int(hidden * transformer_config.get("mlp_ratio", 4.0))
    return int(tokens * (8 * hidden + 2 * mlp) * dtype_bytes)


def estimate_preset_memory(root: str | Path, dtype: torch.dtype = torch.bfloat16, quantize: str = "int8",
                           tokens: int = 0, offload: bool = False) -> MemoryEstimate:
    root = Path(root)
    dtype_bytes = torch.finfo(dtype).bits // 8
    weights = {}
    for name in MODEL_COMPONENTS:
        cfg_file = root / name / "config.json"
        if cfg_file.is_file():
            model = _meta_model(name, json.loads(cfg_file.read_text()))
            weights[name] = component_bytes(model, 4 if name == "vae" and dtype_bytes == 4 else dtype_bytes,
                                            quantize == "int8" and name in QUANTIZED)
    tcfg = json.loads((root / "transformer" / "config.json").read_text()) if (root / "transformer").is_dir() else None
    activations = estimate_activations(tcfg, tokens, dtype_bytes) if tcfg and tokens else 0
    return MemoryEstimate(weights, activations, offload)


def check_fits(estimate: MemoryEstimate, device: torch.device) -> None:
    """Raise InsufficientMemoryError (with the estimate) when a CUDA device has less free memory than needed."""
    if device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    if estimate.peak > free:
        raise InsufficientMemoryError(
            f"not enough GPU memory: {estimate.describe()}, but only {free / 2**30:.2f} GiB free. "
            f"Try --quantize int8, CPU offload, or a smaller resolution/window.")
