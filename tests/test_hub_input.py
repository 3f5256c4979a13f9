"""`expand hf://datasets/OWNER/NAME[@REV][/PATH]` (issue 14 section 1) and the split rules of
parquet folders (item 3): a hand-built Hugging Face cache with HF_HUB_OFFLINE=1, and the
huggingface_hub boundary (HfApi.dataset_info, HfFileSystem.open, hf_hub_download) faked
against the real signatures. No network."""
from __future__ import annotations

import hashlib
import inspect
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import FAST, run_cli
from test_inputs import HUB_SCHEMA, hub_rows, outputs, source_records

SHA = "a" * 40
OTHER = "b" * 40
REPO = "owner/llava-mini"


def write_split_files(folder, records, layout):
    """`layout`: {relative path: (first, end)} slices of the records, in the lmms-lab schema."""
    rows = hub_rows(records)
    for name, (a, b) in layout.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows[a:b], schema=HUB_SCHEMA), folder / name, row_group_size=2)
    return folder


TRAIN_TEST = {"data/train-00000-of-00002.parquet": (0, 5), "data/train-00001-of-00002.parquet": (5, 9),
              "data/test-00000-of-00001.parquet": (9, 12)}


def records12():
    base = source_records()
    return (base + base)[:12]


def hand_built_cache(cache, files_from, commit=SHA, ref="main", repo=REPO):
    """huggingface_hub's layout: blobs/<hash>, snapshots/<commit>/<path> -> blob, refs/<ref> = commit."""
    root = cache / ("datasets--" + repo.replace("/", "--"))
    for src in sorted(p for p in files_from.rglob("*") if p.is_file()):
        data = src.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / commit / src.relative_to(files_from)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    (root / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    return root


@pytest.fixture
def offline(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_a_parquet_folder_with_train_and_test_is_not_merged(tmp_path):
    """Item 3: 9 train + 3 test rows became 12 `train` records."""
    folder = write_split_files(tmp_path / "ds", records12(), TRAIN_TEST)
    run_cli("expand", folder, "--out", tmp_path / "o", *FAST, "--workers", "0")
    got = outputs(tmp_path / "o")
    assert [r["id"] for r in got] == [r["id"] for r in records12()[:9]]
    manifest = json.loads((tmp_path / "o" / "cogalign.json").read_text())
    assert manifest["records"] == 9 and manifest["input_identity"]["split"] == "train"
    run_cli("expand", folder, "--split", "test", "--out", tmp_path / "t", *FAST, "--workers", "0")
    assert [r["id"] for r in outputs(tmp_path / "t")] == [r["id"] for r in records12()[9:]]
    bad = run_cli("expand", folder, "--split", "dev", "--out", tmp_path / "d", *FAST, expect=2).output
    assert "no split 'dev'; it has train, test; pick one with --split" in bad and bad.count("\n") == 1


def test_ambiguous_folders_are_refused_and_card_configs_are_followed(tmp_path):
    ambiguous = write_split_files(tmp_path / "a", records12(), {"train.parquet": (0, 4), "extra.parquet": (4, 8)})
    out = run_cli("expand", ambiguous, "--out", tmp_path / "o1", *FAST, expect=2).output
    assert "extra.parquet) belongs to no split of train" in out and out.count("\n") == 1
    no_train = write_split_files(tmp_path / "b", records12(), {"validation.parquet": (0, 4), "test.parquet": (4, 8)})
    out = run_cli("expand", no_train, "--out", tmp_path / "o2", *FAST, expect=2).output
    assert "2 splits (validation, test) and no train split; pick one with --split" in out
    carded = write_split_files(tmp_path / "c", records12(), {"one/x.parquet": (0, 3), "two/y.parquet": (3, 7)})
    (carded / "README.md").write_text("---\nconfigs:\n- config_name: one\n  data_files: one/*.parquet\n"
                                      "- config_name: two\n  data_files:\n  - split: train\n    path: two/*.parquet\n"
                                      "  default: true\n---\n# card\n")
    run_cli("expand", carded, "--out", tmp_path / "o3", *FAST, "--workers", "0")
    assert len(outputs(tmp_path / "o3")) == 4  # the default config
    run_cli("expand", carded, "--config", "one", "--out", tmp_path / "o4", *FAST, "--workers", "0")
    assert len(outputs(tmp_path / "o4")) == 3
    out = run_cli("expand", carded, "--config", "three", "--out", tmp_path / "o5", *FAST, expect=2).output
    assert "no config 'three'; it has one, two; pick one with --config" in out


def test_offline_from_the_cache_equals_the_same_files_given_by_path(tmp_path, offline):
    files = write_split_files(tmp_path / "repo", records12(), TRAIN_TEST)
    hand_built_cache(offline, files)
    run_cli("expand", f"hf://datasets/{REPO}", "--out", tmp_path / "hub", *FAST, "--workers", "0")
    run_cli("expand", files, "--out", tmp_path / "local", *FAST, "--workers", "0")
    hub_shards = sorted((tmp_path / "hub" / "data").iterdir())
    assert [p.read_bytes() for p in hub_shards] == [p.read_bytes() for p in sorted((tmp_path / "local" / "data").iterdir())]
    assert len(outputs(tmp_path / "hub")) == 9
    identity = json.loads((tmp_path / "hub" / "cogalign.json").read_text())["input_identity"]
    assert identity["repo"] == REPO and identity["commit"] == SHA and identity["revision"] == "main"
    assert (identity["config"], identity["split"]) == ("default", "train")
    assert identity["files"] == ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]
    # resume: the same commit is the same input
    again = run_cli("expand", f"hf://datasets/{REPO}", "--out", tmp_path / "hub", *FAST, "--workers", "0").output
    assert "skipped 1 shards already complete (resume)" in again
    # main moved to another commit: another input, not resumed
    hand_built_cache(offline, files, commit=OTHER)
    moved = run_cli("expand", f"hf://datasets/{REPO}", "--out", tmp_path / "hub", *FAST, expect=2).output
    assert "input:" in moved and OTHER[:12] in moved


def test_revisions_paths_and_one_line_errors_offline(tmp_path, offline):
    files = write_split_files(tmp_path / "repo", records12(), TRAIN_TEST)
    hand_built_cache(offline, files, commit=OTHER, ref="refs/pr/1")
    hand_built_cache(offline, files)
    run_cli("expand", f"hf://datasets/{REPO}@refs%2Fpr%2F1", "--split", "test", "--out", tmp_path / "pr", *FAST, "--workers", "0")
    assert json.loads((tmp_path / "pr" / "cogalign.json").read_text())["input_identity"]["commit"] == OTHER
    assert len(outputs(tmp_path / "pr")) == 3
    run_cli("expand", f"hf://datasets/{REPO}@{SHA}/data/test-00000-of-00001.parquet", "--out", tmp_path / "one",
            *FAST, "--workers", "0")
    assert len(outputs(tmp_path / "one")) == 3
    (files / "notes").mkdir()
    (files / "notes" / "a.json").write_text("[]")
    hand_built_cache(offline, files / "notes", repo="owner/json-only")
    for spec, extra, needle in [
        ("hf://datasets/owner/absent", [], "not in the Hugging Face cache; HF_HUB_OFFLINE=1 is set"),
        (f"hf://datasets/{REPO}@v2", [], "revision 'v2' is not in the cache (cached: main, refs/pr/1)"),
        (f"hf://datasets/{REPO}", ["--split", "dev"], "no split 'dev'; it has train, test"),
        ("hf://datasets/owner/json-only", [], "no .parquet files"),
        (f"hf://{REPO}", [], f"write hf://datasets/{REPO}"),
        ("hf://datasets/owner/bad name", [], "is not a valid Hub repo id"),
    ]:
        out = run_cli("expand", spec, *extra, "--out", tmp_path / "err", *FAST, expect=2).output
        assert needle in out and out.count("\n") == 1, out
    assert not (tmp_path / "err").exists()


def _checked(real, fake):
    """A fake that binds its arguments to the real function's signature first."""
    signature = inspect.signature(real)

    def call(*args, **kwargs):
        named = dict(signature.bind(*args, **kwargs).arguments)  # TypeError if the real one would refuse them
        named.pop("self", None)
        for name, param in signature.parameters.items():
            if param.kind is param.VAR_KEYWORD:
                named.update(named.pop(name, {}))
        return fake(**named)
    return call


def test_online_a_slice_downloads_only_the_files_its_records_live_in(tmp_path, monkeypatch):
    """At the huggingface_hub boundary: the revision is resolved by HfApi.dataset_info, row counts come
    from footers read through HfFileSystem (no download), and hf_hub_download fetches only the files
    holding the slice's records."""
    import huggingface_hub
    from huggingface_hub import HfApi, HfFileSystem
    from huggingface_hub.hf_api import DatasetInfo

    layout = {f"data/train-0000{i}-of-00003.parquet": (3 * i, 3 * i + 3) for i in range(3)}
    remote = write_split_files(tmp_path / "remote", records12(), layout)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example")
    calls = {"info": [], "open": [], "download": []}

    def dataset_info(repo_id, revision=None, files_metadata=False, **_):
        calls["info"].append((repo_id, revision, files_metadata))
        siblings = [{"rfilename": p.relative_to(remote).as_posix(), "size": p.stat().st_size}
                    for p in sorted(remote.rglob("*.parquet"))]
        return DatasetInfo(id=repo_id, sha=SHA, siblings=siblings, private=False, downloads=0, likes=0, tags=[])

    def fs_open(path, mode="rb", block_size=None, **_):
        calls["open"].append((path, block_size))
        return open(remote / path.split(f"@{SHA}/", 1)[1], mode)

    def download(repo_id, filename, repo_type=None, revision=None, cache_dir=None, endpoint=None,
                 local_files_only=False, **_):
        calls["download"].append((repo_id, filename, repo_type, revision, endpoint, local_files_only))
        return str(remote / filename)

    monkeypatch.setattr(HfApi, "dataset_info", _checked(HfApi.dataset_info, lambda **kw: dataset_info(**kw)))
    monkeypatch.setattr(HfFileSystem, "open", _checked(HfFileSystem.open, lambda **kw: fs_open(**kw)))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _checked(huggingface_hub.hf_hub_download, download))
    run_cli("expand", f"hf://datasets/{REPO}", "--out", tmp_path / "o", *FAST, "--workers", "0",
            "--shard-size", "3", "--num-shards", "3", "--shard-index", "1")
    assert calls["info"] == [(REPO, None, True)]
    assert sorted(p for p, _ in calls["open"]) == [f"datasets/{REPO}@{SHA}/{name}" for name in sorted(layout)]
    # only the slice's file is fetched (asked for again by the start-up estimate: a cache hit at a commit sha)
    assert set(calls["download"]) == {(REPO, "data/train-00001-of-00003.parquet", "dataset", SHA, "https://hub.example", False)}
    assert [p.name for p in (tmp_path / "o" / "data").iterdir()] == ["train-00001-of-00003.parquet"]
    assert [r["id"] for r in outputs(tmp_path / "o")] == [r["id"] for r in records12()[3:6]]


@pytest.mark.parametrize("error,needle", [
    ("RepositoryNotFoundError", "dataset repo not found or not accessible"),
    ("RevisionNotFoundError", "revision 'nope' does not exist in owner/llava-mini"),
])
def test_online_repo_and_revision_not_found_are_one_line(tmp_path, monkeypatch, error, needle):
    import huggingface_hub.errors as errors
    from huggingface_hub import HfApi

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def fail(**_):
        import importlib

        http = importlib.import_module(errors.Response.__module__.split(".")[0])  # the HTTP client huggingface_hub uses
        response = http.Response(404, request=http.Request("GET", "https://huggingface.co/api/datasets/x"))
        raise getattr(errors, error)("404 Client Error", response=response)

    monkeypatch.setattr(HfApi, "dataset_info", _checked(HfApi.dataset_info, fail))
    out = run_cli("expand", f"hf://datasets/{REPO}@nope", "--out", tmp_path / "o", *FAST, expect=2).output
    assert needle in out and out.count("\n") == 1


def test_split_of_a_save_to_disk_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"id": f"r{i}", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}
            for i in range(5)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:3]),
                          "test": datasets.Dataset.from_list(rows[3:])}).save_to_disk(str(tmp_path / "dd"))
    run_cli("expand", tmp_path / "dd", "--split", "test", "--out", tmp_path / "o", *FAST, "--workers", "0")
    assert [r["id"] for r in outputs(tmp_path / "o")] == ["r3", "r4"]
    shutil.rmtree(tmp_path / "o")
    out = run_cli("expand", tmp_path / "dd", "--split", "dev", "--out", tmp_path / "o", *FAST, expect=2).output
    assert "no split 'dev'; it has" in out


@pytest.mark.parametrize("via_hub", [False, True])
def test_show_rereads_the_split_and_commit_the_run_read(tmp_path, offline, via_hub):
    """`show` re-reads a record's embedded image from the input by position: from the split (and, for
    hf://datasets, the commit) the run read, not the folder's default split."""
    from cogalign.inspect.records import bytes_from_input
    from test_inputs import IMAGES

    files = write_split_files(tmp_path / "repo", records12(), TRAIN_TEST)
    hand_built_cache(offline, files)
    source = f"hf://datasets/{REPO}" if via_hub else files
    run_cli("expand", source, "--split", "test", "--out", tmp_path / "o", *FAST, "--workers", "0")
    manifest = json.loads((tmp_path / "o" / "cogalign.json").read_text())
    first = outputs(tmp_path / "o")[0]
    assert bytes_from_input(first, manifest) == (IMAGES.parent / records12()[9]["image"]).read_bytes()


def test_the_card_names_the_hub_source_its_commit_and_the_split_read(tmp_path, offline):
    """The card said `from llava-mini` for `--split test` of a Hub repo, under `split: train`: neither the
    commit nor that the rows are the source's test split was stated."""
    files = write_split_files(tmp_path / "repo", records12(), TRAIN_TEST)
    hand_built_cache(offline, files)
    run_cli("expand", f"hf://datasets/{REPO}", "--split", "test", "--out", tmp_path / "hub", *FAST, "--workers", "0")
    card = (tmp_path / "hub" / "README.md").read_text()
    assert f"from `hf://datasets/{REPO}@{SHA[:12]}` (config default, split test; here its `train` split)" in card
    run_cli("expand", files, "--out", tmp_path / "local", *FAST, "--workers", "0")
    assert "from `repo` (config default, split train)\n" in (tmp_path / "local" / "README.md").read_text()


def test_validate_reads_hub_datasets_and_splits_as_expand_does(tmp_path, offline):
    """`validate hf://datasets/...` failed with "path ... does not exist", and validate had no --split:
    the test split of a folder could not be checked before an expand of it."""
    files = write_split_files(tmp_path / "repo", records12(), TRAIN_TEST)
    hand_built_cache(offline, files)
    for source in (f"hf://datasets/{REPO}", files):
        out = run_cli("validate", source, "--split", "test", "--workers", "0", "--no-progress").output
        assert "records: 3  would expand: 3" in out, out
    out = run_cli("validate", f"hf://datasets/{REPO}", "--split", "dev", "--no-progress", expect=2).output.strip()
    assert out.startswith("error:") and len(out.splitlines()) == 1 and "no split 'dev'" in out, out


@pytest.mark.parametrize("command", [["export", "--to", "llava-json", "--out", "x.json"], ["stats"],
                                     ["publish", "--repo", "a/b", "--dry-run"]])
def test_a_hub_dataset_given_to_an_output_command_says_to_expand_it_first(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = run_cli(command[0], f"hf://datasets/{REPO}", *command[1:], expect=2).output.strip()
    assert len(out.splitlines()) == 1 and f"hf://datasets/{REPO}: a Hub dataset" in out, out
    assert f"cogalign expand hf://datasets/{REPO}" in out


def test_offline_a_split_missing_some_of_its_shards_in_the_cache_is_refused(tmp_path, offline):
    """Offline, a cache holding 1 of the 2 train files read 5 of the 9 train records without a word."""
    files = write_split_files(tmp_path / "repo", records12(), TRAIN_TEST)
    hand_built_cache(offline, files)
    snapshot = offline / ("datasets--" + REPO.replace("/", "--")) / "snapshots" / SHA
    (snapshot / "data" / "train-00001-of-00002.parquet").unlink()
    out = run_cli("expand", f"hf://datasets/{REPO}", "--out", tmp_path / "o", *FAST, expect=2).output.strip()
    assert len(out.splitlines()) == 1 and "1 of the 2 files of split 'train' are here" in out, out
    assert "train-00001-of-00002.parquet is missing" in out and not (tmp_path / "o").exists()
    one = f"hf://datasets/{REPO}/data/train-00000-of-00002.parquet"  # the file that is there, named
    assert "records: 5  would expand" in run_cli("validate", one, "--workers", "0", "--no-progress").output
    assert "records: 3  would expand" in run_cli("validate", f"hf://datasets/{REPO}", "--split", "test",
                                                 "--workers", "0", "--no-progress").output


def test_a_local_folder_missing_one_of_its_shards_is_refused(tmp_path):
    files = write_split_files(tmp_path / "repo", records12(), TRAIN_TEST)
    (files / "data" / "train-00000-of-00002.parquet").unlink()
    out = run_cli("validate", files, "--no-progress", expect=2).output.strip()
    assert len(out.splitlines()) == 1 and "train-00000-of-00002.parquet is missing" in out, out
