"""Per-record random choices (spec §7): region, template and insert position of each new turn.

Each kind draws from its own generator seeded by (run seed, record index, kind), so
the choices for one kind do not depend on which other kinds are produced.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from cogalign.targets.regions import Region, sample_region
from cogalign.targets.templates import TemplateSampler

__all__ = ["TurnPlan", "record_rng", "plan_turns", "KIND_STREAM"]

KIND_STREAM = {"vq": 1, "px": 2}


@dataclass(frozen=True)
class TurnPlan:
    """One new (human, gpt) pair: its target kind, region, template and position (after pair `position`)."""

    kind: str
    region: Region
    template_id: int
    position: int


def record_rng(seed: int, index: int, kind: str) -> np.random.Generator:
    """The generator for one record and one kind."""
    if kind not in KIND_STREAM:
        raise ValueError(f"unknown target kind {kind!r}; choose from {', '.join(KIND_STREAM)}")
    return np.random.default_rng([seed, index, KIND_STREAM[kind]])


def plan_turns(seed: int, index: int, n_pairs: int, targets: Sequence[str], regions: Sequence[str],
               resolutions: Mapping[str, tuple[int, int]], aligns: Mapping[str, int],
               sampler: TemplateSampler) -> list[TurnPlan]:
    """One plan per kind in `targets`; each kind draws region, template id, then position."""
    if n_pairs < 1:
        raise ValueError(f"a conversation needs at least one (human, gpt) pair to insert after, got {n_pairs}")
    plans = []
    for kind in targets:
        rng = record_rng(seed, index, kind)
        height, width = resolutions[kind]
        region = sample_region(rng, regions, height, width, aligns.get(kind, 1))
        template_id = sampler.sample_id(kind, rng)
        position = int(rng.integers(1, n_pairs + 1))
        plans.append(TurnPlan(kind, region, template_id, position))
    return plans
