"""Failure focus for the world-target tuners: draw more of the world specs the model currently gets wrong.

The world-target losses give (almost) no gradient where a sample is already right, so with uniformly drawn specs
most of the costly differentiable sampling teaches nothing: the shipped T2I model draws 97% of captions on black
right and half of those on gray wrong. `FailureFocus` keeps each group's (by default shape, colour and background)
failure rate as decayed counts of the tuner's own recent samples, with a Beta(1, 1) prior so an unseen group counts
as 50%, and draws specs from `sample` (default `world.sample_spec`) by rejection with probability proportional to
`floor` plus the group's rate, so every group keeps at least floor / (floor + 1) of its uniform share.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from magic_demo import world


@dataclass
class FailureFocus:
    keys: tuple[str, ...] = ("shape", "colour", "background")  # ClipSpec fields that make a group
    decay: float = 0.99  # per update (training step): the counts reflect the last ~1 / (1 - decay) steps
    floor: float = 0.1
    sample: Callable[[np.random.Generator], world.ClipSpec] = world.sample_spec  # the specs drawn before rejection
    fails: dict[str, float] = field(default_factory=dict)
    seen: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"`decay` must be in (0, 1], got {self.decay!r}")
        if self.floor <= 0:
            raise ValueError(f"`floor` must be > 0, got {self.floor!r}")

    def group(self, spec: world.ClipSpec) -> str:
        return "|".join(str(getattr(spec, k)) for k in self.keys)

    def rate(self, spec: world.ClipSpec) -> float:
        """The group's estimated failure rate (posterior mean)."""
        g = self.group(spec)
        return (self.fails.get(g, 0.0) + 1.0) / (self.seen.get(g, 0.0) + 2.0)

    def draw(self, rng: np.random.Generator,
             exclude: Callable[[world.ClipSpec], bool] = lambda spec: False) -> world.ClipSpec:
        """One spec, its group drawn with probability proportional to floor + rate (skipping `exclude`d specs)."""
        while True:
            spec = self.sample(rng)
            if not exclude(spec) and rng.random() * (self.floor + 1.0) < self.floor + self.rate(spec):
                return spec

    def update(self, specs: Sequence[world.ClipSpec], failures: Sequence[float]) -> None:
        """Decay every count, then add one step's samples: `failures` in [0, 1] per spec (e.g. the fraction of a
        clip's frames with the wrong shape or colour class)."""
        if len(specs) != len(failures):
            raise ValueError(f"got {len(specs)} specs and {len(failures)} failures")
        for g in self.seen:
            self.seen[g] *= self.decay
            self.fails[g] *= self.decay
        for spec, f in zip(specs, failures):
            g = self.group(spec)
            self.seen[g] = self.seen.get(g, 0.0) + 1.0
            self.fails[g] = self.fails.get(g, 0.0) + float(np.clip(f, 0.0, 1.0))

    def worst(self, n: int = 5) -> list[tuple[str, float]]:
        """The n groups with the highest estimated failure rate among those seen (for logs)."""
        rates = {g: (self.fails[g] + 1.0) / (self.seen[g] + 2.0) for g in self.seen}
        return sorted(((g, round(r, 3)) for g, r in rates.items()), key=lambda gr: -gr[1])[:n]

    def state_dict(self) -> dict:
        return {"fails": dict(self.fails), "seen": dict(self.seen)}

    def load_state_dict(self, state: dict) -> None:
        self.fails, self.seen = dict(state["fails"]), dict(state["seen"])
