"""DMD2 step distillation as Magic 1-For-1 runs it.

Three models from one base: the few-step generator G (a full copy), and a score network whose LoRA adapter
(peft) is the *fake* score at scale 1.0 and, on the same frozen base, the *real* score at scale 0.25 (the paper
shifts the real model slightly toward the fake one; it stopped training collapse). The fake LoRA is trained on
G's samples with the flow-matching loss E || n - x0_hat - u_fake(z_t, t) ||^2, z_t = t n + (1 - t) x0_hat; G is
updated once per `fake_updates_per_g` fake updates with the distribution-matching gradient
(x0_fake - x0_real) / mean|x0_hat - x0_real|. G samples by backward simulation on its own few-step schedule.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
from peft import LoraConfig

from magic_demo.train.batches import TrainBatch, noise_levels, velocity

ADAPTER = "fake"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "proj_mlp", "proj_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]


@dataclass(frozen=True)
class DMD2Config:
    real_lora_scale: float = 0.25
    fake_lora_scale: float = 1.0
    fake_updates_per_g: int = 5
    lora_rank: int = 16
    guidance_scale: Optional[float] = None  # for a CFG-distilled base: the guidance input used throughout


class DMD2:
    """Holds G and the LoRA score network; `step()` does one fake update and, every 5th, one G update."""

    def __init__(self, base, sigmas: torch.Tensor, cfg: DMD2Config = DMD2Config(), lr_fake: float = 1e-4,
                 lr_g: float = 1e-5):
        self.cfg = cfg
        self.sigmas = sigmas  # G's few-step schedule, ending in 0
        self.generator = copy.deepcopy(base).train().requires_grad_(True)  # the base may come in frozen
        self.score = copy.deepcopy(base).eval()
        self.score.requires_grad_(False)
        self.score.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, target_modules=LORA_TARGETS,
                                          init_lora_weights=True), adapter_name=ADAPTER)
        self.lora_params = [p for n, p in self.score.named_parameters() if "lora_" in n]
        for p in self.lora_params:
            p.requires_grad_(True)
        self.opt_fake = torch.optim.AdamW(self.lora_params, lr=lr_fake, weight_decay=0.0)
        self.opt_g = torch.optim.AdamW(self.generator.parameters(), lr=lr_g, weight_decay=0.0)
        self.fake_updates = 0
        self.g_updates = 0

    def state_dict(self) -> dict:
        """Everything a resumed run needs: G, the fake LoRA, both optimizers and the update counters."""
        return {"generator": self.generator.state_dict(),
                "lora": {n: p.detach().clone() for n, p in self.score.named_parameters() if "lora_" in n},
                "opt_g": self.opt_g.state_dict(), "opt_fake": self.opt_fake.state_dict(),
                "fake_updates": self.fake_updates, "g_updates": self.g_updates}

    def load_state_dict(self, state: dict) -> None:
        self.generator.load_state_dict(state["generator"])
        params = dict(self.score.named_parameters())
        with torch.no_grad():
            for name, value in state["lora"].items():
                params[name].copy_(value)
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_fake.load_state_dict(state["opt_fake"])
        self.fake_updates, self.g_updates = state["fake_updates"], state["g_updates"]

    def _guidance(self, n: int) -> Optional[torch.Tensor]:
        return None if self.cfg.guidance_scale is None else torch.full((n,), float(self.cfg.guidance_scale))

    def score_velocity(self, z, sigma, batch: TrainBatch, lora_scale: float) -> torch.Tensor:
        self.score.set_adapters([ADAPTER], weights=[lora_scale])
        return velocity(self.score, z, sigma, batch, self._guidance(len(z)))

    def generate_x0(self, batch: TrainBatch, gen: torch.Generator, grad: bool) -> torch.Tensor:
        """Backward simulation: run G's own chain to a random step k without grad, then predict x0 there."""
        x = torch.randn(batch.x0.shape, generator=gen)
        k = int(torch.randint(0, len(self.sigmas) - 1, (1,), generator=gen))
        g = self._guidance(len(x))
        with torch.no_grad():
            for i in range(k):
                s = self.sigmas[i].expand(len(x))
                x = x + velocity(self.generator, x, s, batch, g) * (self.sigmas[i + 1] - self.sigmas[i])
        s = self.sigmas[k].expand(len(x))
        with torch.set_grad_enabled(grad):
            return x - s.view(-1, 1, 1, 1, 1) * velocity(self.generator, x, s, batch, g)

    def fake_loss(self, x0_hat: torch.Tensor, batch: TrainBatch, gen: torch.Generator) -> torch.Tensor:
        t = noise_levels(len(x0_hat), gen, shift=1.0)
        n = torch.randn(x0_hat.shape, generator=gen)
        tv = t.view(-1, 1, 1, 1, 1)
        z = tv * n + (1 - tv) * x0_hat
        return torch.nn.functional.mse_loss(self.score_velocity(z, t, batch, self.cfg.fake_lora_scale), n - x0_hat)

    def generator_loss(self, x0_hat: torch.Tensor, batch: TrainBatch, gen: torch.Generator) -> torch.Tensor:
        t = noise_levels(len(x0_hat), gen, shift=1.0).clamp(0.02, 0.98)
        n = torch.randn(x0_hat.shape, generator=gen)
        tv = t.view(-1, 1, 1, 1, 1)
        z = tv * n + (1 - tv) * x0_hat.detach()
        with torch.no_grad():
            x0_fake = z - tv * self.score_velocity(z, t, batch, self.cfg.fake_lora_scale)
            x0_real = z - tv * self.score_velocity(z, t, batch, self.cfg.real_lora_scale)
            weight = 1.0 / (x0_hat.detach() - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True).clamp_min(1e-6)
            grad = (x0_fake - x0_real) * weight
        return 0.5 * torch.nn.functional.mse_loss(x0_hat, (x0_hat - grad).detach())

    def step(self, batch: TrainBatch, gen: torch.Generator) -> dict:
        # 1. fake score update on a fresh generator sample (no gradient into G)
        x0_hat = self.generate_x0(batch, gen, grad=False)
        loss_fake = self.fake_loss(x0_hat, batch, gen)
        self.opt_fake.zero_grad(set_to_none=True)
        loss_fake.backward()
        torch.nn.utils.clip_grad_norm_(self.lora_params, 1.0)
        self.opt_fake.step()
        self.fake_updates += 1
        logs = {"loss_fake": loss_fake.item()}
        # 2. generator update, once per `fake_updates_per_g` fake updates
        if self.fake_updates % self.cfg.fake_updates_per_g == 0:
            x0_hat = self.generate_x0(batch, gen, grad=True)
            loss_g = self.generator_loss(x0_hat, batch, gen)
            self.opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            torch.nn.utils.clip_grad_norm_(self.generator.parameters(), 1.0)
            self.opt_g.step()
            self.g_updates += 1
            logs["loss_g"] = loss_g.item()
        return logs
