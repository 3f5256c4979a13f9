import numpy as np
import pytest

from cogalign.targets.plan import KIND_STREAM, TurnPlan, plan_turns, record_rng
from cogalign.targets.regions import QUARTERS, sample_region
from cogalign.targets.templates import TemplateSampler

SAMPLER = TemplateSampler()
RES = {"vq": (672, 672), "px": (32, 32)}
ALIGN = {"vq": 8, "px": 1}


def plan(index, targets=("vq", "px"), seed=0, n_pairs=4, regions=QUARTERS):
    return plan_turns(seed, index, n_pairs, targets, regions, RES, ALIGN, SAMPLER)


def test_same_seed_and_index_same_plan():
    assert plan(7) == plan(7)
    assert plan(7, seed=3) == plan(7, seed=3)
    assert [p.kind for p in plan(7)] == ["vq", "px"]
    assert [p.kind for p in plan(7, targets=("px", "vq"))] == ["px", "vq"]


def test_different_index_or_seed_differs():
    plans = {tuple(plan(i)) for i in range(100)}
    assert len(plans) > 95
    assert sum(plan(i) != plan(i, seed=1) for i in range(50)) > 45


def test_kinds_are_independent_streams():
    for i in range(30):
        both = plan(i, ("vq", "px"))
        assert plan(i, ("px",)) == [both[1]]
        assert plan(i, ("vq",)) == [both[0]]
        assert plan(i, ("px", "vq")) == [both[1], both[0]]


def test_draw_order_region_template_position():
    rng = record_rng(5, 11, "px")
    region = sample_region(rng, QUARTERS, 32, 32, 1)
    template_id = SAMPLER.sample_id("px", rng)
    position = int(rng.integers(1, 4))
    assert plan_turns(5, 11, 3, ("px",), QUARTERS, RES, ALIGN, SAMPLER) == [TurnPlan("px", region, template_id, position)]
    fresh = np.random.default_rng([5, 11, KIND_STREAM["px"]])
    assert record_rng(5, 11, "px").integers(1 << 30) == fresh.integers(1 << 30)


def test_plan_values_in_range_and_roughly_uniform():
    plans = [p for i in range(400) for p in plan(i, n_pairs=3, regions=("box",) + QUARTERS)]
    assert {p.position for p in plans} == {1, 2, 3}
    for p in plans:
        assert 0 <= p.template_id < 20
        if p.kind == "vq":
            assert all(v % 8 == 0 for v in p.region.box)
    assert len({p.template_id for p in plans if p.kind == "vq"}) == 20
    assert len({p.region.name for p in plans}) == 5


def test_plan_errors():
    with pytest.raises(ValueError, match="at least one"):
        plan(0, n_pairs=0)
    with pytest.raises(ValueError, match="unknown target kind"):
        record_rng(0, 0, "rgb")
