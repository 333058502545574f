"""Convert a Magic 1-For-1 / HunyuanVideo DiT checkpoint in the original key naming into a diffusers
`HunyuanVideoTransformer3DModel` (and back, for tests and exports).

The two layouts differ in names and in three tensor layouts: the original fuses q/k/v into one `*_qkv`
linear, fuses a single block's q/k/v and MLP-in into `linear1`, and orders the final AdaLN modulation as
[shift, scale] where diffusers uses [scale, shift]. Every key must be accounted for: unknown or missing keys
are reported by name and refused unless a partial load is asked for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

N = r"(\d+)"


@dataclass(frozen=True)
class Rule:
    original: str  # module path in the original checkpoint ({n} = block index)
    diffusers: tuple[str, ...]  # module path(s) in diffusers (several: the original tensor is split)
    layout: str = "copy"  # copy | split (equal parts) | split_mlp (q, k, v of hidden size, rest MLP) | swap

    def pattern(self, side: str) -> re.Pattern:
        text = self.original if side == "original" else self.diffusers[0] if len(self.diffusers) == 1 else None
        return re.compile(re.escape(text).replace(re.escape("{n}"), N)) if text else None


def _r(original: str, *diffusers: str, layout: str = "copy") -> Rule:
    return Rule(original, diffusers, layout)


REFINER = "txt_in.individual_token_refiner.blocks.{n}"
DREFINER = "context_embedder.token_refiner.refiner_blocks.{n}"
DOUBLE, DDOUBLE = "double_blocks.{n}", "transformer_blocks.{n}"
SINGLE, DSINGLE = "single_blocks.{n}", "single_transformer_blocks.{n}"

RULES: tuple[Rule, ...] = (
    _r("img_in.proj", "x_embedder.proj"),
    _r("time_in.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    _r("time_in.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
    _r("guidance_in.mlp.0", "time_text_embed.guidance_embedder.linear_1"),
    _r("guidance_in.mlp.2", "time_text_embed.guidance_embedder.linear_2"),
    _r("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    _r("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    _r("txt_in.input_embedder", "context_embedder.proj_in"),
    _r("txt_in.t_embedder.mlp.0", "context_embedder.time_text_embed.timestep_embedder.linear_1"),
    _r("txt_in.t_embedder.mlp.2", "context_embedder.time_text_embed.timestep_embedder.linear_2"),
    _r("txt_in.c_embedder.linear_1", "context_embedder.time_text_embed.text_embedder.linear_1"),
    _r("txt_in.c_embedder.linear_2", "context_embedder.time_text_embed.text_embedder.linear_2"),
    _r(f"{REFINER}.norm1", f"{DREFINER}.norm1"),
    _r(f"{REFINER}.norm2", f"{DREFINER}.norm2"),
    _r(f"{REFINER}.self_attn_qkv", f"{DREFINER}.attn.to_q", f"{DREFINER}.attn.to_k", f"{DREFINER}.attn.to_v",
       layout="split"),
    _r(f"{REFINER}.self_attn_proj", f"{DREFINER}.attn.to_out.0"),
    _r(f"{REFINER}.mlp.fc1", f"{DREFINER}.ff.net.0.proj"),
    _r(f"{REFINER}.mlp.fc2", f"{DREFINER}.ff.net.2"),
    _r(f"{REFINER}.adaLN_modulation.1", f"{DREFINER}.norm_out.linear"),
    _r(f"{DOUBLE}.img_mod.linear", f"{DDOUBLE}.norm1.linear"),
    _r(f"{DOUBLE}.img_attn_qkv", f"{DDOUBLE}.attn.to_q", f"{DDOUBLE}.attn.to_k", f"{DDOUBLE}.attn.to_v",
       layout="split"),
    _r(f"{DOUBLE}.img_attn_q_norm", f"{DDOUBLE}.attn.norm_q"),
    _r(f"{DOUBLE}.img_attn_k_norm", f"{DDOUBLE}.attn.norm_k"),
    _r(f"{DOUBLE}.img_attn_proj", f"{DDOUBLE}.attn.to_out.0"),
    _r(f"{DOUBLE}.img_mlp.fc1", f"{DDOUBLE}.ff.net.0.proj"),
    _r(f"{DOUBLE}.img_mlp.fc2", f"{DDOUBLE}.ff.net.2"),
    _r(f"{DOUBLE}.txt_mod.linear", f"{DDOUBLE}.norm1_context.linear"),
    _r(f"{DOUBLE}.txt_attn_qkv", f"{DDOUBLE}.attn.add_q_proj", f"{DDOUBLE}.attn.add_k_proj",
       f"{DDOUBLE}.attn.add_v_proj", layout="split"),
    _r(f"{DOUBLE}.txt_attn_q_norm", f"{DDOUBLE}.attn.norm_added_q"),
    _r(f"{DOUBLE}.txt_attn_k_norm", f"{DDOUBLE}.attn.norm_added_k"),
    _r(f"{DOUBLE}.txt_attn_proj", f"{DDOUBLE}.attn.to_add_out"),
    _r(f"{DOUBLE}.txt_mlp.fc1", f"{DDOUBLE}.ff_context.net.0.proj"),
    _r(f"{DOUBLE}.txt_mlp.fc2", f"{DDOUBLE}.ff_context.net.2"),
    _r(f"{SINGLE}.linear1", f"{DSINGLE}.attn.to_q", f"{DSINGLE}.attn.to_k", f"{DSINGLE}.attn.to_v",
       f"{DSINGLE}.proj_mlp", layout="split_mlp"),
    _r(f"{SINGLE}.linear2", f"{DSINGLE}.proj_out"),
    _r(f"{SINGLE}.q_norm", f"{DSINGLE}.attn.norm_q"),
    _r(f"{SINGLE}.k_norm", f"{DSINGLE}.attn.norm_k"),
    _r(f"{SINGLE}.modulation.linear", f"{DSINGLE}.norm.linear"),
    _r("final_layer.linear", "proj_out"),
    _r("final_layer.adaLN_modulation.1", "norm_out.linear", layout="swap"),
)


class ConversionError(ValueError):
    """A checkpoint that does not map one-to-one onto the model."""


def _match(rule: Rule, module: str, side: str) -> Optional[str]:
    """Block index ('' if the rule has none) when `module` matches the rule on `side`, else None."""
    if side == "original":
        m = rule.pattern("original").fullmatch(module)
        return None if m is None else (m.group(1) if m.groups() else "")
    for i, target in enumerate(rule.diffusers):
        m = re.compile(re.escape(target).replace(re.escape("{n}"), N)).fullmatch(module)
        if m:
            return f"{m.group(1) if m.groups() else ''}|{i}"
    return None


def original_to_diffusers(state: dict, hidden_size: int) -> tuple[dict, list[str]]:
    """Rename/split the original keys. Returns (diffusers state dict, original keys no rule knows)."""
    out, unknown = {}, []
    for key, tensor in state.items():
        module, _, param = key.rpartition(".")
        for rule in RULES:
            n = _match(rule, module, "original")
            if n is None:
                continue
            names = [d.replace("{n}", n) for d in rule.diffusers]
            if rule.layout == "split":
                parts = tensor.chunk(len(names), dim=0)
            elif rule.layout == "split_mlp":
                parts = torch.split(tensor, [hidden_size] * 3 + [tensor.shape[0] - 3 * hidden_size], dim=0)
            elif rule.layout == "swap":
                shift, scale = tensor.chunk(2, dim=0)
                parts = (torch.cat([scale, shift], dim=0),)
            else:
                parts = (tensor,)
            out.update({f"{name}.{param}": part.contiguous() for name, part in zip(names, parts)})
            break
        else:
            unknown.append(key)
    return out, unknown


def diffusers_to_original(state: dict) -> tuple[dict, list[str]]:
    """The inverse: fuse the split tensors and restore the original names (for tests and exports)."""
    pending: dict[tuple[Rule, str, str], dict[int, torch.Tensor]] = {}
    out, unknown = {}, []
    for key, tensor in state.items():
        module, _, param = key.rpartition(".")
        for rule in RULES:
            hit = _match(rule, module, "diffusers")
            if hit is None:
                continue
            n, i = hit.split("|")
            pending.setdefault((rule, n, param), {})[int(i)] = tensor
            break
        else:
            unknown.append(key)
    for (rule, n, param), parts in pending.items():
        name = f"{rule.original.replace('{n}', n)}.{param}"
        if len(parts) != len(rule.diffusers):
            unknown.extend(f"{rule.diffusers[i].replace('{n}', n)}.{param}" for i in parts)
            continue
        tensors = [parts[i] for i in range(len(rule.diffusers))]
        if rule.layout == "swap":
            scale, shift = tensors[0].chunk(2, dim=0)
            out[name] = torch.cat([shift, scale], dim=0)
        else:
            out[name] = torch.cat(tensors, dim=0) if len(tensors) > 1 else tensors[0]
    return out, unknown


# The Magic 1-For-1 / HunyuanVideo-I2V DiT (DESIGN.md section 2).
MAGIC141_CONFIG = dict(in_channels=33, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
                       num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
                       qk_norm="rms_norm", guidance_embeds=False, text_embed_dim=4096, pooled_projection_dim=768,
                       rope_theta=256.0, rope_axes_dim=(16, 56, 56), image_condition_type="latent_concat")


def read_checkpoint(path: str | Path) -> dict:
    """Tensors of a .safetensors or .pth/.pt checkpoint (pickle only with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    for wrapper in ("module", "model", "state_dict"):  # training frameworks nest the weights
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path} does not hold a flat dict of tensors")
    return state


def convert_transformer(state: dict, config: Optional[dict] = None, allow_partial: bool = False):
    """Build the diffusers transformer (on the meta device, then filled) from an original-named state dict."""
    from diffusers import HunyuanVideoTransformer3DModel

    config = dict(config or MAGIC141_CONFIG)
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    converted, unknown = original_to_diffusers(state, hidden)
    with torch.device("meta"):
        model = HunyuanVideoTransformer3DModel(**config)
    expected = set(model.state_dict())
    missing = sorted(expected - set(converted))
    unexpected = sorted(unknown + [k for k in converted if k not in expected])
    if (missing or unexpected) and not allow_partial:
        raise ConversionError(
            f"checkpoint does not match the model: {len(missing)} missing key(s) {missing[:5]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:5]} (pass allow_partial to load anyway)")
    loaded = {k: v for k, v in converted.items() if k in expected}
    # A partial load (asked for) leaves the missing tensors at zero; the report names them.
    loaded.update({k: torch.zeros(model.state_dict()[k].shape, dtype=torch.float32) for k in missing})
    model.load_state_dict(loaded, strict=True, assign=True)
    return model.eval(), {"missing": missing, "unexpected": unexpected}
