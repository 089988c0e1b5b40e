"""What every poisoning attack shares: a seeded plan and an on-the-fly trigger.

An attack is a `_target_` node in `conf/attack/` that builds one of these classes. The poison stage
calls `plan(num_samples, rng, caption_pool, ctx)` once; the plan (JSON, `poison_plan.json`) holds the
poisoned indices, per-sample lists aligned to them (`poison_text`, `trigger_position`, ...) and, in
`trigger`, any plan-level trigger state drawn from the seed (a WaNet control grid, a noise seed) or
the name of a file the plan wrote beside it (an optimised patch, a chosen image). Every later
reader builds the attack from config again and `bind`s it to the plan, so all stages see the same
trigger. `apply(image, caption, entry)` poisons one training sample; `apply_test(image)` is the
trigger as it is applied at test time for the attack success rate (docs/attacks.md, per attack).

Draw order inside `plan` is fixed (indices, per-sample trigger parameters, captions, trigger state):
the same seed gives the same plan byte for byte.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from clipbd.attacks.plan import choose_indices

TestTrigger = tuple[Callable[[torch.Tensor], torch.Tensor], str]  # (image -> triggered, target class)


class Attack:
    """Base class: dirty-label poisoning (caption replaced by a target caption) of round(rate·N)
    random samples. Subclasses set `name` and override `trigger` (and, as needed, `choose`,
    `sample_params`, `draw_trigger`, `bind`, `header`)."""

    name = "attack"
    threat_model = "single"

    def __init__(self, poison_rate: float = 0.01, target_class: str = "banana",
                 target_captions: Sequence[str] | None = None):
        if not 0.0 <= float(poison_rate) <= 1.0:
            raise ValueError(f"attack.poison_rate={poison_rate}: must be in [0, 1]")
        self.poison_rate = float(poison_rate)
        self.target_class = target_class
        self.target_captions = list(target_captions) if target_captions else None
        self.state: dict[str, Any] = {}  # plan-level trigger state, set by bind()

    # ------------------------------------------------------------------ plan
    def plan(self, num_samples: int, rng: np.random.Generator, caption_pool: Sequence[str],
             ctx: Any = None) -> dict[str, Any]:
        """The poison plan (see module docstring); `ctx` (clipbd.attacks.context.PlanContext) gives
        the attacks that need them the training captions, held-out images, a surrogate model."""
        idx = self.choose(num_samples, rng, ctx)
        params = self.sample_params(idx, rng, ctx)
        texts = self.captions_for(idx, rng, caption_pool, ctx)
        plan = {"attack": self.name, "threat_model": self.threat_model, "num_samples": int(num_samples),
                "poison_rate": self.poison_rate, "poison_count": int(len(idx)),
                "backdoor_label": self.target_class, "target_class": self.target_class,
                **self.header(), "poison_indices": idx.tolist()}
        if texts is not None:
            plan["poison_text"] = texts
        plan |= params
        trigger = self.draw_trigger(rng, ctx)
        if trigger:
            plan["trigger"] = trigger
        self.bind(plan, getattr(ctx, "run_dir", None))
        return plan

    def choose(self, num_samples: int, rng: np.random.Generator, ctx: Any) -> np.ndarray:
        return choose_indices(num_samples, self.poison_rate, rng)

    def sample_params(self, idx: np.ndarray, rng: np.random.Generator, ctx: Any) -> dict[str, list]:
        """Per-sample trigger parameters, lists aligned to `idx` (e.g. trigger_position)."""
        return {}

    def captions_for(self, idx: np.ndarray, rng: np.random.Generator, pool: Sequence[str],
                     ctx: Any) -> list[str] | None:
        """Dirty label: each poisoned sample gets a caption drawn from the target captions
        (`attack.target_captions`, else the dataset's prompts for the target class)."""
        pool = self.target_captions or list(pool)
        if not pool:
            raise ValueError("attack: no target captions (set attack.target_captions or dataset.prompts)")
        return [pool[i] for i in rng.integers(0, len(pool), size=len(idx))]

    def header(self) -> dict[str, Any]:
        """Plan-level fields describing the trigger (recorded, not read back)."""
        return {}

    def draw_trigger(self, rng: np.random.Generator, ctx: Any) -> dict[str, Any]:
        """Plan-level trigger state (JSON), drawn after everything else."""
        return {}

    def bind(self, plan: dict[str, Any], run_dir: str | Path | None) -> "Attack":
        """Take the plan's trigger state, so apply/apply_test draw the trigger the plan drew."""
        self.state = dict(plan.get("trigger") or {})
        return self

    # ------------------------------------------------------------------ triggers
    def trigger(self, img: torch.Tensor, entry: dict[str, Any] | None) -> torch.Tensor:
        """img [3, H, W] in [0, 1] -> triggered copy; entry None means test time."""
        raise NotImplementedError

    def apply(self, img: torch.Tensor, caption: str, entry: dict[str, Any]) -> tuple[torch.Tensor, str]:
        """One planned training sample: trigger with its recorded parameters, caption replaced."""
        return self.trigger(img, entry), entry.get("poison_text", caption)

    def apply_test(self, img: torch.Tensor) -> torch.Tensor:
        return self.trigger(img, None)

    def test_triggers(self) -> dict[str, TestTrigger]:
        """name -> (test-time trigger, target class); one per trigger of a multi-trigger attack."""
        return {self.name: (self.apply_test, self.target_class)}


def need_state(attack: Attack, key: str) -> Any:
    """The bound plan's trigger state `key`, or a message saying the plan must be bound first."""
    if key not in attack.state:
        raise RuntimeError(f"attack {attack.name}: trigger state '{key}' missing — bind the attack to its "
                           f"poison_plan.json (clipbd.registry.build_attack does) before applying it")
    return attack.state[key]
