import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cogalign.targets.splice import conversation_pairs, make_pair, splice_pairs


def conversation(n):
    turns = []
    for i in range(n):
        turns.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + f"q{i}"})
        turns.append({"from": "gpt", "value": f"a{i}"})
    return turns


@st.composite
def cases(draw):
    n = draw(st.integers(1, 6))
    positions = draw(st.lists(st.integers(1, n), max_size=5))
    return n, positions


@settings(max_examples=300, deadline=None)
@given(cases())
def test_splice_invariants(case):
    n, positions = case
    original = conversation(n)
    snapshot = [dict(t) for t in original]
    inserts = [(p, *make_pair(f"new q{k}", f"new a{k}")) for k, p in enumerate(positions)]
    out = splice_pairs(original, inserts)

    assert original == snapshot
    assert out is not original
    assert len(out) == 2 * (n + len(inserts))
    assert [t["from"] for t in out] == ["human", "gpt"] * (n + len(inserts))
    kept = [t for t in out if any(t is o for o in original)]
    assert len(kept) == len(original) and all(a is b for a, b in zip(kept, original))
    assert out[0] is original[0] and out[1] is original[1]
    assert conversation_pairs(out) == n + len(inserts)

    for k, (p, human, gpt) in enumerate(inserts):
        at = next(i for i, t in enumerate(out) if t is human)
        assert out[at + 1] is gpt
        assert sum(1 for t in out[:at] if any(t is o for o in original)) == 2 * p
        earlier_same = [h for q, h, _ in inserts[:k] if q == p]
        assert all(next(i for i, t in enumerate(out) if t is h) < at for h in earlier_same)


def test_splice_example_and_ties():
    conv = conversation(2)
    a, b, c = (make_pair(f"x{i}", f"y{i}") for i in range(3))
    out = splice_pairs(conv, [(2, *a), (1, *b), (2, *c)])
    assert [t["value"] for t in out] == ["<image>\nq0", "a0", "x1", "y1", "q1", "a1", "x0", "y0", "x2", "y2"]
    assert splice_pairs(conv, []) == conv


@pytest.mark.parametrize("position", [0, 3, -1, True, 1.0, "1", None])
def test_splice_position_bounds(position):
    with pytest.raises(ValueError, match="out of range 1..2"):
        splice_pairs(conversation(2), [(position, *make_pair("q", "a"))])


def test_splice_accepts_numpy_integer_positions():
    out = splice_pairs(conversation(2), [(np.int64(1), *make_pair("q", "a"))])
    assert out[2]["value"] == "q"


def test_make_pair():
    assert make_pair("ask", "answer") == ({"from": "human", "value": "ask"}, {"from": "gpt", "value": "answer"})


@pytest.mark.parametrize("human, gpt", [
    ("<image> what", "a"), ("q", "see <image>"), ("q</s>", "a"), ("q", "a</s>"),
    ("ASSISTANT: hi", "a"), ("q", "x ASSISTANT: y"),
])
def test_make_pair_refuses_format_tokens(human, gpt):
    with pytest.raises(ValueError, match="conversation format"):
        make_pair(human, gpt)


def test_make_pair_requires_text():
    with pytest.raises(ValueError):
        make_pair(None, "a")
