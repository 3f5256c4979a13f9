"""Insert new human/gpt pairs at pair boundaries of a LLaVA conversation (spec §6)."""
from __future__ import annotations

import operator
from typing import Sequence

__all__ = ["conversation_pairs", "splice_pairs", "make_pair", "FORBIDDEN"]

# Strings that break LLaVA training: a second image token, vicuna's round separator and role tag.
FORBIDDEN = ("<image>", "</s>", "ASSISTANT:")


def conversation_pairs(conversations: Sequence[dict]) -> int:
    """Number of (human, gpt) pairs of an already validated conversation."""
    return len(conversations) // 2


def _position(position: object, n: int) -> int:
    try:
        p = operator.index(position)
    except TypeError:
        p = None
    if p is None or isinstance(position, bool) or not 1 <= p <= n:
        raise ValueError(f"insert position {position!r} out of range 1..{n} (after an existing pair)")
    return p


def splice_pairs(conversations: list[dict], inserts: Sequence[tuple[int, dict, dict]]) -> list[dict]:
    """A new list: the original turns in order, with each (position p, human, gpt) placed after pair p.

    p runs over 1..n (never before the first pair, which holds `<image>`); inserts
    sharing a position keep their order in `inserts`.
    """
    n = conversation_pairs(conversations)
    after: dict[int, list[dict]] = {}
    for position, human, gpt in inserts:
        after.setdefault(_position(position, n), []).extend((human, gpt))
    out: list[dict] = []
    for pair in range(1, n + 1):
        out.extend(conversations[2 * pair - 2:2 * pair])
        out.extend(after.get(pair, ()))
    out.extend(conversations[2 * n:])
    return out


def make_pair(human_text: str, gpt_text: str, check_answer: bool = True) -> tuple[dict, dict]:
    """A (human, gpt) turn pair; refuses text that would break the conversation format.
    `check_answer=False` skips scanning the answer: for the renderers' own output (digits and
    punctuation only), where a scan of megabytes of RGB text would cost milliseconds."""
    checked = (("human", human_text), ("gpt", gpt_text)) if check_answer else (("human", human_text),)
    for role, text in checked:
        if not isinstance(text, str):
            raise ValueError(f"{role} text must be a str, got {type(text).__name__}")
        bad = [token for token in FORBIDDEN if token in text]
        if bad:
            raise ValueError(f"{role} text contains {bad[0]!r}, which would break the conversation format")
    return {"from": "human", "value": human_text}, {"from": "gpt", "value": gpt_text}
