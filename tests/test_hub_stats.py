"""`cogalign stats`: characters and tokens per turn kind, checked against a direct count of the records."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cogalign.expand.writer import read_shard
from helpers import EXAMPLES, hub_warnings_seen, log_a_hub_retry, run_cli
from hub_fixtures import expand_examples


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    return expand_examples(tmp_path_factory.mktemp("stats") / "out", "--shard-size", "6")


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    """A BPE tokenizer trained here on the examples' text plus digits, like an LLM's (digits one by one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    tok.train_from_iterator([EXAMPLES.read_text(), "0 1 2 3 4 5 6 7 8 9 , [ ] < >"],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"]))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path, tok


def by_kind(out, measure):
    """Direct count: kind of each turn from the turn's own text (the answers' and questions' markers)."""
    kinds = {"original": [], "vq_answer": [], "px_answer": [], "vq_question": [], "px_question": []}
    totals = []
    for f in sorted((out / "data").iterdir()):
        for r in read_shard(f):
            conv, total = r["conversations"], 0
            for i, turn in enumerate(conv):
                v = turn["value"]
                answer = conv[i + 1]["value"] if i % 2 == 0 else v
                kind = ("vq" if answer.startswith("<vq start>") else "px" if answer.startswith("<rgb start>") else None)
                key = "original" if kind is None else f"{kind}_{'question' if i % 2 == 0 else 'answer'}"
                kinds[key].append(measure(v))
                total += measure(v)
            totals.append(total)
    return kinds, totals


def summary(values):
    return {"median": float(np.median(values)), "p95": float(np.percentile(values, 95)), "max": int(max(values))}


def test_json_figures_match_a_direct_count(output, tokenizer_file):
    path, tok = tokenizer_file
    tokens = lambda text: len(tok.encode(text, add_special_tokens=False).ids)  # noqa: E731
    chars, _ = by_kind(output, len)
    toks, totals = by_kind(output, tokens)
    max_length = int(np.median(totals))  # some records over, some not
    result = run_cli("stats", output, "--tokenizer", path, "--max-length", max_length, "--json", "--no-progress")
    rep = json.loads(result.stdout)
    assert rep["records"] == 14
    assert {k: v["count"] for k, v in rep["turns"].items()} == {k: len(v) for k, v in chars.items()}
    assert rep["turns"]["vq_answer"]["count"] == rep["turns"]["px_answer"]["count"] == 13
    for kind in chars:
        assert rep["turns"][kind]["chars"] == summary(chars[kind])
        assert rep["turns"][kind]["tokens"] == summary(toks[kind])
    over = sum(t > max_length for t in totals)
    assert 0 < over < 14
    assert rep["records_over_max_length"] == over and rep["share_over_max_length"] == over / 14


def test_table_without_and_with_tokenizer(output, tokenizer_file):
    result = run_cli("stats", output, "--no-progress")
    lines = result.stdout.splitlines()
    assert lines[0].split()[:5] == ["turn", "kind", "count", "chars", "median"]
    assert [line.split("  ")[0] for line in lines[1:6]] == ["original turns", "VQ answers", "RGB answers",
                                                            "VQ questions", "RGB questions"]
    assert "pass --tokenizer" in result.stdout
    result = run_cli("stats", output, "--tokenizer", tokenizer_file[0].parent, "--max-length", "1", "--no-progress")
    assert "tokens median" in result.stdout
    assert "records over --max-length 1: 14 (100.0%)" in result.stdout


def test_bad_tokenizer_is_one_line_error(output, tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    result = run_cli("stats", output, "--tokenizer", tmp_path / "tokenizer.json", expect=2)
    assert "cannot load a tokenizer" in result.output and "Traceback" not in result.output
    result = run_cli("stats", output, "--tokenizer", tmp_path / "missing.json", expect=2)
    assert "no tokenizer.json there" in result.output


def test_a_hub_id_that_cannot_be_fetched_is_one_line_without_the_hubs_retry_warnings(monkeypatch):
    """Offline, huggingface_hub logged a warning per retry (11 lines) above the one-line error."""
    import logging

    from huggingface_hub.utils import logging as hub_logging
    from tokenizers import Tokenizer

    from cogalign.errors import CogalignError
    from cogalign.hub.stats import load_tokenizer

    def offline(spec):
        log_a_hub_retry()
        raise OSError("cannot find the requested files in the local cache")

    monkeypatch.setattr(Tokenizer, "from_pretrained", staticmethod(offline))
    with hub_warnings_seen() as seen:
        with pytest.raises(CogalignError, match="--tokenizer some-org/tok: cannot load a tokenizer"):
            load_tokenizer("some-org/tok")
    assert seen == [] and hub_logging.get_verbosity() == logging.WARNING
