"""CFG distillation: a student that takes the guidance scale w as an input and matches the teacher's guided
velocity (1 + w) u(z, t, text) - w u(z, t, empty) in one forward pass (Magic 1-For-1, section on CFG
distillation). Total loss = lambda_cfg * L_cfg + L_base, L_base the plain flow-matching loss on data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import HunyuanVideoTransformer3DModel

from magic_demo.train.batches import TrainBatch, noise_condition, noise_levels, velocity, weighted_mse


@dataclass(frozen=True)
class CFGDistillConfig:
    w_min: float = 0.0
    w_max: float = 6.0
    lambda_cfg: float = 1.0


def student_from_teacher(teacher: HunyuanVideoTransformer3DModel) -> HunyuanVideoTransformer3DModel:
    """The teacher's architecture plus a guidance embedding, its weights copied; the new embedding's output layer
    starts at zero so the untrained student equals the teacher at every w."""
    config = dict(teacher.config)
    config["guidance_embeds"] = True
    student = HunyuanVideoTransformer3DModel.from_config(config)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and all("guidance_embedder" in k for k in missing), (missing, unexpected)
    last = student.time_text_embed.guidance_embedder.linear_2
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    return student


def cfg_distill_loss(student, teacher, batch: TrainBatch, empty: TrainBatch, generator: torch.Generator,
                     cfg: CFGDistillConfig = CFGDistillConfig(),
                     weights: torch.Tensor | None = None,
                     condition_noise: float = 0.0) -> tuple[torch.Tensor, dict]:
    """One step's loss. `empty` is the same batch with the empty prompt's text embeddings; `weights` [B, 1, t, h, w]
    (optional) weigh the latent positions in both terms (`shape_loss_weights`). With `condition_noise` > 0 the
    student sees noised conditioning latents (`noise_condition`) while the teacher keeps the clean ones: the student
    learns to do from an imperfect first frame what the teacher does from a clean one."""
    b = len(batch.x0)
    sigma = noise_levels(b, generator)
    noise = torch.randn(batch.x0.shape, generator=generator)
    s = sigma.view(-1, 1, 1, 1, 1)
    z = s * noise + (1 - s) * batch.x0
    w = cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(b, generator=generator)
    with torch.no_grad():
        guided = velocity(teacher, z, sigma, batch)
        wv = w.view(-1, 1, 1, 1, 1)
        target = (1 + wv) * guided - wv * velocity(teacher, z, sigma, empty)
    seen = noise_condition(batch, condition_noise, generator)  # the batch itself when condition_noise is 0
    loss_cfg = weighted_mse(velocity(student, z, sigma, seen, guidance=w), target, weights)
    # L_base: the ordinary flow-matching loss on data, at w = 0 (no guidance).
    loss_base = weighted_mse(velocity(student, z, sigma, seen, guidance=torch.zeros(b)), noise - batch.x0, weights)
    loss = cfg.lambda_cfg * loss_cfg + loss_base
    return loss, {"loss_cfg": loss_cfg.item(), "loss_base": loss_base.item()}
