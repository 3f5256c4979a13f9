"""Issue 14 items 10-11: the dataset card and what `publish` uploads: the user's own README.md, links to
files that are not uploaded, local paths, the demo tokenizer, license / task_categories /
source_datasets, and `num_bytes` as `datasets` counts it."""
from __future__ import annotations

import json
from unittest import mock

import pytest
import yaml
from huggingface_hub import HfApi

from cogalign.hub import publish as pub
from cogalign.expand.layout import card_is_ours
from cogalign.expand.report import dataset_card
from helpers import EXAMPLES, FAST, REPO, run_cli
from hub_fixtures import copy_output, expand_examples


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    """A run whose --vq is the demo tokenizer's folder, named by its absolute path."""
    return expand_examples(tmp_path_factory.mktemp("card") / "out", "--vq", REPO / "cogalign" / "assets" / "demo-f8-4096")


def header(card: str) -> dict:
    return yaml.safe_load(card.split("---")[1])


@pytest.fixture(autouse=True)
def online(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def _api():
    api = mock.create_autospec(HfApi, instance=True)
    api.whoami.return_value = {"name": "me"}
    api.upload_folder.return_value = mock.Mock(commit_url="https://hub/commit/abc")
    return api


@pytest.mark.parametrize("fmt", ["parquet", "parquet-embedded"])
def test_num_bytes_is_the_arrow_size_datasets_reports(tmp_path, fmt):
    import datasets

    out = expand_examples(tmp_path / "o", *(["--embed-images"] if fmt == "parquet-embedded" else []))
    builder = datasets.load_dataset_builder(str(out), cache_dir=str(tmp_path / "cache"))
    builder.download_and_prepare()
    split = header((out / "README.md").read_text())["dataset_info"]["splits"][0]
    assert split["num_bytes"] == builder.info.splits["train"].num_bytes
    assert split["num_bytes"] != json.loads((out / "report.json").read_text())["output_bytes"]  # not the file size


def test_card_names_no_file_that_is_not_uploaded_and_warns_of_the_demo_tokenizer(output):
    card = (output / "README.md").read_text()
    uploaded = {p for p, _ in pub.plan_publish(output, "me/x").files}
    assert "rejects.jsonl" not in uploaded and "rejects.jsonl" not in card
    assert "demo" in card and "not for training a model" in card
    meta = header(card)
    assert meta["task_categories"] == ["image-text-to-text"] and "license" not in meta


def test_report_json_holds_no_local_paths(output):
    text = (output / "report.json").read_text()
    assert str(REPO) not in text and str(output) not in text
    assert json.loads(text)["options"]["vq"] == "demo-f8-4096"


def test_license_and_source_dataset_go_into_the_card(output, tmp_path, monkeypatch):
    out = copy_output(output, tmp_path / "o")
    plan = pub.plan_publish(out, "me/x", license="cc-by-4.0")
    assert header(plan.card.decode())["license"] == "cc-by-4.0"
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    pub.publish(plan, api=_api())  # README.md is cogalign's: it gets the license and stays cogalign's
    assert header((out / "README.md").read_text())["license"] == "cc-by-4.0" and card_is_ours(out)
    report = json.loads((out / "report.json").read_text())
    manifest = json.loads((out / "cogalign.json").read_text())
    for given in ("hf://datasets/lmms-lab/LLaVA-NeXT-Data", "hf://datasets/lmms-lab/LLaVA-NeXT-Data@main/data"):
        card = dataset_card(report, {**manifest, "input": given})
        assert header(card)["source_datasets"] == ["lmms-lab/LLaVA-NeXT-Data"]
    hub_identity = {**manifest["input_identity"], "repo": "lmms-lab/LLaVA-NeXT-Data", "commit": "0" * 40}
    assert header(dataset_card(report, {**manifest, "input_identity": hub_identity}))["source_datasets"] == [
        "lmms-lab/LLaVA-NeXT-Data"]
    assert "source_datasets" not in header(dataset_card(report, manifest))


def test_users_own_readme_is_uploaded_only_when_chosen(output, tmp_path, monkeypatch, capsys):
    out = copy_output(output, tmp_path / "o")
    (out / "README.md").write_text("my notes\n")
    result = run_cli("publish", out, "--repo", "me/x", "--dry-run", expect=2)
    text = result.output.strip()
    assert len(text.splitlines()) == 1 and "--card ours" in text and "--card yours" in text
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    plan = pub.plan_publish(out, "me/x", card="ours")
    assert "configs" in header(plan.card.decode())
    assert dict(plan.files)["README.md"] == len(plan.card)
    api = _api()
    pub.publish(plan, api=api)
    assert "README.md" not in api.upload_folder.call_args.kwargs["allow_patterns"]
    kwargs = api.upload_file.call_args.kwargs
    assert kwargs["path_in_repo"] == "README.md" and kwargs["path_or_fileobj"] == plan.card
    assert (out / "README.md").read_text() == "my notes\n"  # the local file is the user's: untouched
    plan = pub.plan_publish(out, "me/x", card="yours")
    assert plan.card is None and dict(plan.files)["README.md"] == len("my notes\n")
    api = _api()
    pub.publish(plan, api=api)
    assert "README.md" in api.upload_folder.call_args.kwargs["allow_patterns"]
    api.upload_file.assert_not_called()


def test_px_only_run_has_no_demo_warning(tmp_path):
    out = tmp_path / "o"
    run_cli("expand", EXAMPLES, "--out", out, *FAST, "--workers", "0", "--targets", "px")
    assert "not for training a model" not in (out / "README.md").read_text()


@pytest.mark.parametrize("given", ["cc by", "x\ny: 1", "CC-BY-4.0", ""])
def test_a_license_that_is_no_hub_id_is_refused_in_one_line(output, given):
    """`--license "x\\ny: 1"` went into the card's YAML as it was: a `y` key of its own; `cc by` is no id."""
    result = run_cli("publish", output, "--repo", "me/x", "--dry-run", "--license", given, expect=2)
    text = result.output.strip()
    assert text.startswith("error: --license") and len(text.splitlines()) == 1, text
    assert header(pub.plan_publish(output, "me/x", license="openrail++").card.decode())["license"] == "openrail++"


def test_an_output_that_kept_no_record_is_not_published(tmp_path, monkeypatch):
    """A run whose every record was rejected (here: images not found) went up as an empty shard, and the
    upload deleted the repo's earlier data/ shards."""
    src = tmp_path / "in.json"
    src.write_text(json.dumps([{"id": f"r{i}", "image": f"gone{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A."}]} for i in range(2)]))
    run_cli("expand", src, "--out", tmp_path / "o", *FAST, "--workers", "0")
    result = run_cli("publish", tmp_path / "o", "--repo", "me/x", "--dry-run", expect=2)
    text = result.output.strip()
    assert text.startswith("error:") and len(text.splitlines()) == 1 and "2 rejected: image_missing (2)" in text, text
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    with pytest.raises(Exception, match="no record to publish"):
        pub.publish(pub.plan_publish(tmp_path / "o", "me/x"), api=_api())
