"""`cogalign publish`: the plan, the refusals, and the calls made to huggingface_hub (mocked at HfApi)."""
from __future__ import annotations

import socket
from unittest import mock

import pytest
from huggingface_hub import HfApi

from cogalign.errors import CogalignError
from cogalign.hub import publish as pub
from helpers import EXAMPLES, FAST, run_cli
from hub_fixtures import copy_output, expand_examples


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    return expand_examples(tmp_path_factory.mktemp("pub") / "out", "--shard-size", "5")


@pytest.fixture(autouse=True)
def online(monkeypatch):
    """The tests decide what is offline (CI may export HF_HUB_OFFLINE=1)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_dry_run_prints_exact_files_sizes_and_target(output, no_network, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.org")
    monkeypatch.setattr(pub, "publish", mock.Mock(side_effect=AssertionError("publish called on a dry run")))
    result = run_cli("publish", output, "--repo", "me/llava-cog", "--private", "--revision", "v1", "--dry-run")
    lines = result.stdout.splitlines()
    assert lines[0] == "target: https://hub.example.org/datasets/me/llava-cog (dataset, private, revision v1)"
    expected = [f"data/train-0000{i}-of-00003.parquet" for i in range(3)] + ["README.md", "report.json"]
    listed = [line.split()[0] for line in lines[1:-2]]
    assert listed == expected
    for line in lines[1:-2]:  # sizes are the files' real sizes
        path, size = line.split()[0], int(line.split()[1].replace(",", ""))
        assert size == (output / path).stat().st_size
    total = sum((output / p).stat().st_size for p in expected)
    assert lines[-2] == f"5 files, {total:,} B"
    assert "not listed here are deleted" in lines[-1]
    assert "stats/" not in result.stdout and "cogalign.json" not in result.stdout


def test_include_all_adds_everything_but_partial(output, tmp_path):
    out = copy_output(output, tmp_path / "o")
    (out / "notes.txt").write_text("mine")
    plan = pub.plan_publish(out, "me/x", include_all=True)
    names = [p for p, _ in plan.files]
    assert {"cogalign.json", "rejects.jsonl", "notes.txt", "stats/shard-00000.json", "README.md"} <= set(names)
    assert not any(n.startswith(".partial") for n in names)


@pytest.mark.parametrize("break_it, message", [
    (lambda out: (out / "data" / "train-00001-of-00003.parquet").unlink(), "1 of 3 shards are not complete"),
    (lambda out: ((out / ".partial").mkdir(), (out / ".partial" / "train-00002-of-00003.parquet").write_bytes(b"x")),
     ".partial/ holds unfinished shards"),
    (lambda out: (out / "report.json").unlink(), "the slices were not merged"),
    (lambda out: (out / "cogalign.json").unlink(), "is this a cogalign output folder"),
])
def test_incomplete_output_is_refused_in_one_line(output, tmp_path, break_it, message):
    out = copy_output(output, tmp_path / "o")
    break_it(out)
    result = run_cli("publish", out, "--repo", "me/x", "--dry-run", expect=2)
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_unmerged_slice_is_refused(tmp_path):
    out = tmp_path / "sliced"
    run_cli("expand", EXAMPLES, "--out", out, *FAST, "--workers", "0", "--shard-size", "7",
            "--num-shards", "2", "--shard-index", "0")
    result = run_cli("publish", out, "--repo", "me/x", "--dry-run", expect=2)
    assert "1 of 2 shards are not complete" in result.output
    assert "run the slices that have not finished, then `cogalign merge-report`" in result.output


@pytest.mark.parametrize("repo", ["noslash", "a/b/c", "me/", "/x", "me/bad name", "me/..x"])
def test_bad_repo_id_is_refused(output, repo):
    with pytest.raises(CogalignError, match="expected OWNER/NAME"):
        pub.plan_publish(output, repo)


def _api():
    api = mock.create_autospec(HfApi, instance=True)  # HfApi 2.x: no upload_large_folder
    api.whoami.return_value = {"name": "me"}
    api.upload_folder.return_value = mock.Mock(commit_url="https://hub/commit/abc")
    return api


def test_upload_calls_and_arguments(output, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    plan = pub.plan_publish(output, "me/llava-cog", revision="v1", private=True)
    api = _api()
    assert pub.publish(plan, api=api) == "https://hub/commit/abc"
    api.whoami.assert_called_once_with(token="hf_test")
    api.create_repo.assert_called_once_with("me/llava-cog", repo_type="dataset", private=True, exist_ok=True,
                                            token="hf_test")
    api.create_branch.assert_called_once_with("me/llava-cog", branch="v1", repo_type="dataset", exist_ok=True,
                                              token="hf_test")
    kwargs = api.upload_folder.call_args.kwargs
    assert kwargs["repo_id"] == "me/llava-cog" and kwargs["repo_type"] == "dataset" and kwargs["revision"] == "v1"
    assert kwargs["folder_path"] == str(output)
    assert kwargs["allow_patterns"] == [p for p, _ in plan.files]  # exactly the planned files
    assert kwargs["delete_patterns"] == ["data/*"]  # an earlier run's shards would join the split
    # the calls come in this order: log in, then create, then upload
    assert [c[0] for c in api.method_calls] == ["whoami", "create_repo", "create_branch", "upload_folder"]


def test_no_branch_created_for_main(output, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    api = _api()
    pub.publish(pub.plan_publish(output, "me/x"), api=api)
    api.create_branch.assert_not_called()
    assert api.upload_folder.call_args.kwargs["revision"] is None


def test_older_hub_uses_upload_large_folder(output, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    api = mock.Mock(spec=["whoami", "create_repo", "create_branch", "upload_large_folder", "upload_folder",
                          "list_repo_files", "create_commit"])
    api.whoami.return_value = {"name": "me"}
    api.list_repo_files.return_value = ["README.md", "data/train-00000-of-00003.parquet",
                                        "data/train-00009-of-00010.parquet"]
    plan = pub.plan_publish(output, "me/x")
    pub.publish(plan, api=api)
    api.upload_large_folder.assert_called_once()
    assert api.upload_large_folder.call_args.kwargs["allow_patterns"] == [p for p, _ in plan.files]
    api.upload_folder.assert_not_called()
    ops = api.create_commit.call_args.kwargs["operations"]  # the stale shards of an earlier run, nothing else
    assert [op.path_in_repo for op in ops] == ["data/train-00009-of-00010.parquet"]


def test_rejected_token_touches_nothing(output, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_revoked")
    api = _api()
    api.whoami.side_effect = OSError("401 Unauthorized")
    with pytest.raises(CogalignError, match="cannot log in") as err:
        pub.publish(pub.plan_publish(output, "me/x"), api=api)
    assert "\n" not in str(err.value)
    api.create_repo.assert_not_called()
    api.upload_folder.assert_not_called()


def test_read_only_token_is_refused_before_any_write(output, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_read")
    api = _api()
    api.whoami.return_value = {"name": "me", "auth": {"accessToken": {"role": "read"}}}
    with pytest.raises(CogalignError, match="read-only"):
        pub.publish(pub.plan_publish(output, "me/x"), api=api)
    assert [c[0] for c in api.method_calls] == ["whoami"]


def test_no_token_or_offline_fails_before_any_call(output, monkeypatch, no_network):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    api = _api()
    with pytest.raises(CogalignError, match="no Hugging Face token"):
        pub.publish(pub.plan_publish(output, "me/x"), api=api)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CogalignError, match="HF_HUB_OFFLINE"):
        pub.publish(pub.plan_publish(output, "me/x"), api=api)
    assert api.method_calls == []


def test_cli_without_token_is_one_line(output, monkeypatch, no_network):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    result = run_cli("publish", output, "--repo", "me/x", expect=2)
    assert result.stderr.strip() == "error: no Hugging Face token: set HF_TOKEN or run `hf auth login`, then rerun"
    assert "Traceback" not in result.output


def test_upload_failure_names_resume(output, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    api = _api()
    api.upload_folder.side_effect = OSError("connection reset")
    with pytest.raises(CogalignError, match="rerun the same command to resume"):
        pub.publish(pub.plan_publish(output, "me/x"), api=api)
