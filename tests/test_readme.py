"""The README says what the code does (issue 7, items 10 and 18)."""
import ast
import re

import pytest

from cogalign.errors import RecordError
from cogalign.inputs.records import check_record
from helpers import REPO

README = (REPO / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(title)
    end = README.find("\n## ", start + 1)
    return README[start:end]


def test_malformed_conversations_are_rejected_with_or_without_an_image():
    text = " ".join(_section("### Bad input").split())
    assert "rejected too, **with or without an image**" in text
    assert "Well-formed text-only and video records pass through unchanged" in text
    system_first = [{"from": "system", "value": "x"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    for record in ({"id": 1, "conversations": system_first},
                   {"id": 2, "image": "a.jpg", "conversations": system_first}):
        with pytest.raises(RecordError):
            check_record(record)


def test_the_whole_job_example_has_a_main_guard():
    section = _section("## In your own pipeline")
    block = re.search(r"The whole job from Python.*?```python\n(.*?)```", section, re.S).group(1)
    tree = ast.parse(block)
    calls = [node for node in tree.body if not isinstance(node, (ast.Import, ast.ImportFrom))]
    assert len(calls) == 1 and isinstance(calls[0], ast.If) and "__main__" in ast.unparse(calls[0].test)
    assert "expand(" in ast.unparse(calls[0])
