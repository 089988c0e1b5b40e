"""Multi-trigger poisoning (the mixes of Huang et al., ICLR 2025, §5): several triggers in one
training set, each poisoned sample carrying exactly one of them. `targets: single` sends every
trigger to `target_class` (the members' own target_class is overridden); `targets: per_trigger`
keeps each member's own `target_class` (and its target captions: the member's `target_captions`,
else the dataset's prompts for that class). The poisoned samples are split evenly over the members
(random assignment from the seed); ASR is reported per trigger (docs/attacks.md).

Members are ordinary attack nodes (`triggers: {name: {_target_: ...}}`); their `poison_rate` is
ignored, and WaNet members have no noise-mode samples here.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from clipbd.attacks.base import Attack, TestTrigger


class MultiTrigger(Attack):
    name = "multi"
    threat_model = "multi"

    def __init__(self, triggers: Mapping[str, Attack], poison_rate: float = 0.01,
                 target_class: str = "banana", target_captions: Sequence[str] | None = None,
                 targets: str = "single"):
        """triggers: name -> attack (built from its node); targets: single | per_trigger."""
        super().__init__(poison_rate, target_class, target_captions)
        if targets not in ("single", "per_trigger"):
            raise ValueError(f"attack.targets={targets}: must be single or per_trigger")
        if not triggers:
            raise ValueError("attack.triggers: name at least one member attack")
        self.members: dict[str, Attack] = {}
        for name, member in triggers.items():
            if not isinstance(member, Attack):
                raise ValueError(f"attack.triggers.{name}: not an attack node (needs a _target_)")
            if targets == "single":
                member.target_class = target_class
                member.target_captions = member.target_captions or self.target_captions
            self.members[str(name)] = member
        self.targets = targets

    def header(self) -> dict[str, Any]:
        return {"targets": self.targets, "triggers": {n: m.name for n, m in self.members.items()},
                "target_classes": {n: m.target_class for n, m in self.members.items()}}

    def _pool(self, member: Attack, pool: Sequence[str], ctx: Any) -> Sequence[str]:
        if member.target_captions or self.targets == "single":
            return pool
        if ctx is None:
            raise ValueError("attack.targets=per_trigger needs the dataset's prompts (a PlanContext)")
        if member.target_class not in ctx.classes:
            raise ValueError(f"attack.triggers: target_class={member.target_class} is not a dataset class")
        return ctx.prompts(member.target_class, n=256, seed=int(ctx.cfg.seed))

    def plan(self, num_samples, rng, caption_pool, ctx=None) -> dict[str, Any]:
        idx = self.choose(num_samples, rng, ctx)
        names = list(self.members)
        which = rng.permutation(len(idx)) % len(names)  # balanced, random assignment
        n = len(idx)
        trig, texts, params = [""] * n, [""] * n, [{} for _ in range(n)]
        for j, name in enumerate(names):
            member, pos = self.members[name], np.nonzero(which == j)[0]
            sub = idx[pos]
            p = member.sample_params(sub, rng, ctx)
            t = member.captions_for(sub, rng, self._pool(member, caption_pool, ctx), ctx)
            for r, q in enumerate(pos):
                trig[q], texts[q] = name, t[r]
                params[q] = {k: v[r] for k, v in p.items()}
        plan = {"attack": self.name, "threat_model": self.threat_model, "num_samples": int(num_samples),
                "poison_rate": self.poison_rate, "poison_count": n,
                "backdoor_label": self.target_class, "target_class": self.target_class, **self.header(),
                "poison_indices": idx.tolist(), "poison_text": texts, "trigger_name": trig,
                "trigger_params": params,
                "trigger": {"members": {nm: self.members[nm].draw_trigger(rng, ctx) for nm in names}}}
        self.bind(plan, getattr(ctx, "run_dir", None))
        return plan

    def bind(self, plan: dict[str, Any], run_dir) -> "MultiTrigger":
        states = (plan.get("trigger") or {}).get("members", {})
        for name, member in self.members.items():
            member.bind({"trigger": states.get(name) or {}}, run_dir)
        return self

    def apply(self, img: torch.Tensor, caption: str, entry: dict[str, Any]) -> tuple[torch.Tensor, str]:
        member = self.members[entry["trigger_name"]]
        return member.apply(img, caption, {**entry["trigger_params"], "poison_text": entry["poison_text"]})

    def apply_test(self, img: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("attack=multi has one test trigger per member: use test_triggers()")

    def test_triggers(self) -> dict[str, TestTrigger]:
        return {name: (m.apply_test, m.target_class) for name, m in self.members.items()}
