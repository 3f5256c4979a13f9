"""`cogalign eval`: duplicate predictions refused unless --allow-duplicates says which wins, missing
turns apart from format failures, an unambiguous PSNR in --json, RGB answers cut before
`<rgb end>` scored on the pixels they give."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cogalign.targets.render import px_text, vq_text
from tests.helpers import run_cli

import numpy as np

RGB_A = px_text(np.array([[10, 20, 30], [40, 50, 60], [70, 80, 90], [100, 110, 120]], np.uint8))
RGB_B = px_text(np.array([[200, 0, 0], [0, 200, 0]], np.uint8))
VQ_A = vq_text(np.array([5, 6, 7, 8]))


@pytest.fixture
def shards(tmp_path) -> Path:
    """r1: a VQ turn (3) and an RGB turn (5); r2: two RGB turns (3, 5)."""
    def conv(*answers):
        turns = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A photo."}]
        for a in answers:
            turns += [{"from": "human", "value": "Targets?"}, {"from": "gpt", "value": a}]
        return turns

    (tmp_path / "out" / "data").mkdir(parents=True)
    recs = [{"id": "r1", "image": "a.png", "conversations": conv(VQ_A, RGB_A)},
            {"id": "r2", "image": "b.png", "conversations": conv(RGB_A, RGB_B)}]
    (tmp_path / "out" / "data" / "train-00000-of-00001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return tmp_path / "out"


def _write(path: Path, preds: list[dict]) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in preds))
    return path


def _eval(shards, preds, *extra, expect=0):
    path = _write(shards.parent / "pred.jsonl", preds)
    return run_cli("eval", "--data", shards, "--predictions", path, *extra, expect=expect)


def _json(shards, preds, *extra):
    return json.loads(_eval(shards, preds, "--json", *extra).stdout)


ALL_RIGHT = [{"id": "r1", "turn": 3, "kind": "vq", "text": VQ_A}, {"id": "r1", "turn": 5, "kind": "px", "text": RGB_A},
             {"id": "r2", "turn": 3, "kind": "px", "text": RGB_A}, {"id": "r2", "turn": 5, "kind": "px", "text": RGB_B}]


def test_duplicates_refused_unless_told_which_wins(shards):
    garbage = {"id": "r2", "turn": 5, "kind": "px", "text": "no idea"}
    preds = ALL_RIGHT + [garbage]  # correct, then garbage, for r2 turn 5
    refused = _eval(shards, preds, expect=2)
    assert "--allow-duplicates" in refused.output and "'r2' turn 5" in refused.output
    assert len(refused.output.strip().splitlines()) == 1
    first, last = _json(shards, preds, "--allow-duplicates", "first"), _json(shards, preds, "--allow-duplicates", "last")
    assert first["px"]["exact_match"] == 1.0 and last["px"]["exact_match"] == pytest.approx(2 / 3)
    assert first["duplicate_turns"] == last["duplicate_turns"] == 1 and first["px"]["duplicates"] == 1
    bad = _eval(shards, preds, "--allow-duplicates", "best", expect=2)
    assert bad.output.strip() == "error: --allow-duplicates 'best': choose first or last"
    # without "turn": two predictions for r1's only RGB turn are duplicates too
    untagged = [{k: v for k, v in p.items() if k != "turn"} for p in ALL_RIGHT[:2]]
    assert "--allow-duplicates" in _eval(shards, untagged + [untagged[1]], expect=2).output


def test_missing_turns_are_counted_apart_from_format_failures(shards):
    result = _json(shards, ALL_RIGHT[:2])  # nothing for r2
    assert result["px"] == {**result["px"], "n": 1, "missing": 2, "format_ok": 1.0, "exact_match": 1.0}
    assert result["vq"]["n"] == 1 and result["vq"]["missing"] == 0
    table = _eval(shards, ALL_RIGHT[:2]).stdout
    assert "turns without a prediction: 2 (missing, not scored)" in table


def test_json_psnr_tells_perfect_from_nothing_scored(shards):
    perfect = _json(shards, ALL_RIGHT)["px"]
    assert perfect["psnr"] == "inf" and perfect["mse"] == 0.0 and perfect["n"] == 3
    assert math.isinf(float(perfect["psnr"]))
    nothing = _json(shards, ALL_RIGHT[:1])["px"]
    assert nothing["n"] == 0 and nothing["missing"] == 3 and nothing["psnr"] is None and nothing["mse"] is None
    off = _json(shards, [{**ALL_RIGHT[1], "text": RGB_A.replace("[10, 20, 30]", "[11, 20, 30]")}])["px"]
    assert off["mse"] == pytest.approx(1 / 12) and off["psnr"] == pytest.approx(10 * math.log10(255 ** 2 * 12))


def test_rgb_answer_cut_before_end_scores_the_pixels_given(shards):
    cut = RGB_A[:RGB_A.index("[70")]  # two complete pixels, then the cut
    result = _json(shards, [{**ALL_RIGHT[1], "text": cut + "[7"}])["px"]
    assert result["format_ok"] == 0.0 and result["exact_match"] == 0.0 and result["truncated"] == 1
    assert result["mae"] == 0.0 and result["psnr"] == "inf"  # every pixel given is right
    wrong = cut.replace("[40, 50, 60]", "[40, 50, 61]")
    result = _json(shards, [{**ALL_RIGHT[1], "text": wrong}])["px"]
    assert result["mae"] == pytest.approx(1 / 6 / 255)
    # a complete answer that stops early still counts the pixels it lacks as 255 off
    short = RGB_A.replace(", [70, 80, 90], [100, 110, 120]", "")
    assert _json(shards, [{**ALL_RIGHT[1], "text": short}])["px"]["mae"] == pytest.approx(0.5)
    vq = _json(shards, [{**ALL_RIGHT[0], "text": VQ_A[:VQ_A.index("7") + 2]}])["vq"]  # "<vq start>5, 6, 7,"
    assert vq["format_ok"] == 0.0 and vq["index_accuracy"] == 0.75 and vq["truncated"] == 1


def test_records_sharing_an_id_are_told_apart_by_index(shards):
    path = shards / "data" / "train-00000-of-00001.jsonl"
    twin = json.loads(path.read_text().splitlines()[1])  # a second record with id r2 (index 2)
    twin["conversations"][3]["value"] = RGB_B
    path.write_text(path.read_text() + json.dumps(twin) + "\n")
    preds = [{**p, "index": 0 if p["id"] == "r1" else 1} for p in ALL_RIGHT]
    preds += [{"id": "r2", "index": 2, "turn": 3, "kind": "px", "text": RGB_B},
              {"id": "r2", "index": 2, "turn": 5, "kind": "px", "text": RGB_A}]  # wrong
    result = _json(shards, preds)
    assert result["px"]["n"] == 5 and result["px"]["exact_match"] == pytest.approx(4 / 5)
    assert result["unknown_predictions"] == 0
    assert _json(shards, preds + [{**preds[-1], "id": "r1"}])["unknown_predictions"] == 1  # index 2 is not r1
    refused = _eval(shards, ALL_RIGHT, expect=2)  # without index, r2 names two records
    assert "id 'r2' names 2 records" in refused.output and "\"index\"" in refused.output


def test_generate_and_eval_refuse_an_incomplete_expand_output(tmp_path):
    """A deleted shard: `train` refused it, while `generate` answered and `eval` scored the other
    shards' turns as if they were all."""
    from tests.train_fixtures import quadrant_set

    src = quadrant_set(tmp_path / "src", 4, seed=0)
    out = tmp_path / "out"
    run_cli("expand", src, "--out", out, "--targets", "px", "--px-resolution", "2", "--shard-size", "2",
            "--workers", "0", "--no-progress")
    shards = sorted((out / "data").glob("*.parquet"))
    assert len(shards) == 2
    shards[1].unlink()
    preds = _write(tmp_path / "p.jsonl", [])
    for argv in (["generate", "--model", tmp_path / "no-run", "--data", out, "--out", tmp_path / "g.jsonl"],
                 ["eval", "--data", out, "--predictions", preds]):
        res = run_cli(*argv, expect=2)
        assert "shards are not complete" in res.output and shards[1].name in res.output, res.output
        assert res.output.strip().count("\n") == 0, res.output
    assert not (tmp_path / "g.jsonl").exists()


def test_predictions_that_are_a_folder_are_named_as_such(shards):
    """`--predictions out/` said `no such file`, though the folder is there."""
    res = run_cli("eval", "--data", shards, "--predictions", shards, expect=2)
    assert "is a folder" in res.output and "no such file" not in res.output, res.output


def test_a_kind_other_than_vq_or_px_is_named(shards):
    """`"kind": "rgb"` was counted as a prediction for an unknown id or turn, hiding the typo."""
    res = _eval(shards, ALL_RIGHT[:1] + [{**ALL_RIGHT[1], "kind": "rgb"}], expect=2)
    assert res.output.startswith("error: ") and "line 2: kind 'rgb'" in res.output and '"px"' in res.output
    assert len(res.output.strip().splitlines()) == 1
