"""docs/spec.md §8's provenance example has exactly the keys `expand` writes (issue 17, item 11: it
lacked `vq_encoder`), the nested ones included."""
from __future__ import annotations

import json
import re

from tests.helpers import EXAMPLES, FAST, REPO, run_cli


def _keys(value, prefix=""):
    if isinstance(value, dict):
        return {prefix + k for k in value} | {x for k, v in value.items() for x in _keys(v, f"{prefix}{k}.")}
    if isinstance(value, list) and value:
        return _keys(value[0], prefix + "[].")
    return set()


def test_spec_provenance_example_matches_the_output(tmp_path):
    section = (REPO / "docs" / "spec.md").read_text().split("## 8.")[1].split("\n## ")[0]
    example = json.loads(re.search(r"```json\n(.*?)```", section, re.S).group(1).replace(", …]", "]"))
    run_cli("expand", EXAMPLES, "--out", tmp_path / "out", "--format", "jsonl", "--workers", "0", *FAST)
    shard = next((tmp_path / "out" / "data").glob("*.jsonl"))
    written = json.loads(shard.read_text().splitlines()[0])["cogalign"]
    assert _keys(example) == _keys(written)
    assert written["vq_encoder"] == example["vq_encoder"]  # the defaults, as the example shows them
