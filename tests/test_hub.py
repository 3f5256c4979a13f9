"""Tokenizers from the Hugging Face Hub (a hand-built offline cache stands in for the Hub),
`vq push` at the HfApi boundary, `vq list`, and the vqgan-4096 preset's sources."""
from __future__ import annotations

import json
import shutil

import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from cogalign.tokenizers import TokenizerError, load_tokenizer
from cogalign.tokenizers.hub import parse_hub_spec, push, snapshot_commit
from cogalign.tokenizers.presets import DEMO_DIR
from helpers import EXAMPLES, FAST, run_cli
from tokenizer_fixtures import TINY_PARAMS, make_random_taming_state, photos, taming_yaml

torch.set_num_threads(1)
REV = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root, repo_id, files: dict, subfolder: str = "", rev: str = REV, branch: str = "main"):
    """A Hugging Face cache entry as huggingface_hub writes it: blobs, a snapshot of links, refs/BRANCH."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / rev / subfolder
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name, src in files.items():
        blob = repo / "blobs" / f"{rev[:8]}-{name.replace('/', '_')}"
        shutil.copyfile(src, blob)
        (snap / name).symlink_to(blob)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / branch).write_text(rev)
    return snap


@pytest.fixture
def offline(tmp_path, monkeypatch):
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("COGALIGN_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("COGALIGN_VQGAN_4096", raising=False)
    return cache


@pytest.fixture
def demo_files():
    return {"model.safetensors": DEMO_DIR / "model.safetensors", "config.yaml": DEMO_DIR / "config.yaml"}


def test_spec_parsing():
    assert parse_hub_spec("hf://acme/tok") == parse_hub_spec("acme/tok")
    hs = parse_hub_spec("hf://acme/tok@v1/f8/4096")
    assert (hs.repo_id, hs.revision, hs.subfolder) == ("acme/tok", "v1", "f8/4096")
    assert str(hs) == "hf://acme/tok@v1/f8/4096"
    for bad in ("hf://acme", "hf://acme/", "hf:///tok", "hf://acme/tok@", "hf://acme/../x"):
        with pytest.raises(TokenizerError, match="hf://OWNER/REPO"):
            parse_hub_spec(bad)


def test_offline_cache_gives_the_same_indices_as_the_path(offline, demo_files):
    hub_cache(offline, "acme/vqgan-demo", demo_files)
    images = photos((64, 64))
    by_path = load_tokenizer(str(DEMO_DIR))
    by_hub = load_tokenizer("hf://acme/vqgan-demo")
    assert by_hub.content_hash == by_path.content_hash  # the hash of the weights, not of a path
    assert by_hub.name == f"acme/vqgan-demo@{REV}"  # issue 15 #8: the commit main resolved to is recorded
    np.testing.assert_array_equal(by_hub.encode(images), by_path.encode(images))
    # a pinned revision and a subfolder resolve through the same cache
    sd = make_random_taming_state(TINY_PARAMS, seed=3)
    st, yml = offline.parent / "tiny.safetensors", offline.parent / "tiny.yaml"
    save_file(sd, str(st))
    yml.write_text(taming_yaml())
    snap = hub_cache(offline, "acme/many", {"model.safetensors": st, "config.yaml": yml}, subfolder="tiny",
                     rev="f" * 40, branch="v2")
    tiny = load_tokenizer(f"hf://acme/many@{'f' * 40}/tiny")
    np.testing.assert_array_equal(tiny.encode(images), load_tokenizer(str(snap)).encode(images))
    assert load_tokenizer("hf://acme/many@v2/tiny").content_hash == tiny.content_hash


def test_a_cached_commit_loads_without_asking_the_hub(offline, demo_files, monkeypatch):
    """A run records its Hub tokenizer at a commit; `show`/`gallery`/resume load it by that hash.
    With HF_HUB_OFFLINE unset and the Hub unreachable, huggingface_hub listed the commit's files
    first (~25 s of retries, a dozen warning lines) before it fell back to the cache: a commit is
    immutable, so a cached snapshot that holds the weights is used as it is."""
    import huggingface_hub
    from huggingface_hub import HfApi

    hub_cache(offline, "acme/vqgan-demo", demo_files)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    asked = []
    monkeypatch.setattr(HfApi, "list_repo_tree", lambda self, *a, **kw: asked.append(a) or iter(()))
    tok = load_tokenizer(f"hf://acme/vqgan-demo@{REV}")
    assert asked == [] and tok.name == f"acme/vqgan-demo@{REV}"
    assert tok.content_hash == load_tokenizer("demo").content_hash


def test_an_uncached_commit_with_the_hub_unreachable_is_one_line_at_once(offline, monkeypatch):
    """The same commit not in the cache, the Hub unreachable: one line at once, not huggingface_hub's
    retries of the commit's file listing (~25 s, a dozen warning lines) first."""
    import huggingface_hub
    from huggingface_hub import HfApi

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    listed = []

    def unreachable(self, *a, **kw):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(HfApi, "repo_info", unreachable)
    monkeypatch.setattr(HfApi, "list_repo_tree", lambda self, *a, **kw: listed.append(a) or unreachable(self))
    with pytest.raises(TokenizerError) as ei:
        load_tokenizer(f"hf://acme/absent@{REV}")
    msg = str(ei.value)
    assert listed == [] and "\n" not in msg
    assert f"hf://acme/absent@{REV}: not in the Hugging Face cache {offline}" in msg and "cannot be reached" in msg
    # an answer from the Hub (HfHubHTTPError is an OSError) is not taken for an unreachable Hub
    from huggingface_hub.errors import RepositoryNotFoundError

    def not_found(self, *a, **kw):
        import httpx2 as httpx  # what huggingface_hub >= 1.0 builds its errors on

        request = httpx.Request("GET", "https://huggingface.co/api/models/acme/absent")
        raise RepositoryNotFoundError("404 Client Error: Repository Not Found",
                                      response=httpx.Response(404, request=request))

    monkeypatch.setattr(HfApi, "repo_info", not_found)
    monkeypatch.setattr(HfApi, "list_repo_tree", not_found)
    with pytest.raises(TokenizerError) as ei:
        load_tokenizer(f"hf://acme/absent@{REV}")
    assert "not found or not accessible" in str(ei.value)


def test_offline_miss_says_where_it_looked(offline):
    with pytest.raises(TokenizerError) as ei:
        load_tokenizer("hf://acme/absent")
    msg = str(ei.value)
    assert "hf://acme/absent" in msg and str(offline) in msg and "HF_HUB_OFFLINE=1" in msg


def test_expand_with_a_hub_tokenizer_from_the_cache(offline, demo_files, tmp_path):
    hub_cache(offline, "acme/vqgan-demo", demo_files)
    run_cli("expand", EXAMPLES, "--out", tmp_path / "hub", "--vq", "hf://acme/vqgan-demo", "--workers", "0", *FAST)
    run_cli("expand", EXAMPLES, "--out", tmp_path / "path", "--vq", str(DEMO_DIR), "--workers", "0", *FAST)
    tables = [pq.read_table(next((tmp_path / d / "data").glob("*.parquet"))).to_pylist() for d in ("hub", "path")]
    assert [r["conversations"] for r in tables[0]] == [r["conversations"] for r in tables[1]]
    prov = orjson.loads(next(r["cogalign"] for r in tables[0] if r["cogalign"]))
    assert prov["tokenizer_hash"] == load_tokenizer("demo").content_hash


def test_vqgan_4096_from_home_env_or_config(offline, demo_files, tmp_path, monkeypatch):
    hub_cache(offline, "team/vqgan-4096", demo_files)
    monkeypatch.setenv("COGALIGN_VQGAN_4096", "team/vqgan-4096")
    tok = load_tokenizer("vqgan-4096")
    # recorded with the repo and commit it came from (c3: it said "vqgan-4096" whichever repo it was)
    assert tok.name == f"vqgan-4096 (team/vqgan-4096@{snapshot_commit(tok.source)})"
    assert len(snapshot_commit(tok.source)) == 40 and tok.content_hash == load_tokenizer("demo").content_hash
    monkeypatch.delenv("COGALIGN_VQGAN_4096")
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    (home / "config.yaml").write_text("tokenizers:\n  vqgan-4096: hf://team/vqgan-4096\n")
    assert load_tokenizer("vqgan-4096").content_hash == tok.content_hash
    # the local folder comes first (a tokenizer of vqgan-4096's geometry: 4096 codes, f=8, dim 4)
    params = dict(TINY_PARAMS, n_embed=4096)
    sd = make_random_taming_state(params, seed=5)
    local = home / "tokenizers" / "vqgan-4096"
    local.mkdir(parents=True)
    save_file(sd, str(local / "model.safetensors"))
    (local / "config.yaml").write_text(taming_yaml(params))
    assert load_tokenizer("vqgan-4096").content_hash not in (tok.content_hash, "")


def test_vqgan_4096_missing_names_both_ways(offline, tmp_path):
    with pytest.raises(TokenizerError) as ei:
        load_tokenizer("vqgan-4096")
    msg = str(ei.value)
    assert str(tmp_path / "home" / "tokenizers" / "vqgan-4096") in msg
    assert "cogalign vq train" in msg                                   # way 1: train it there
    assert "COGALIGN_VQGAN_4096=OWNER/NAME" in msg and "config.yaml" in msg  # way 2: a Hub repo
    result = run_cli("expand", EXAMPLES, "--out", tmp_path / "o", "--vq", "vqgan-4096", *FAST, expect=2)
    assert "COGALIGN_VQGAN_4096" in result.output and "Traceback" not in result.output


def _tokenizer_folder(tmp_path):
    d = tmp_path / "tok"
    d.mkdir()
    for name in ("model.safetensors", "config.yaml", "train_metrics.json"):
        shutil.copyfile(DEMO_DIR / name, d / name)
    return d


def test_push_dry_run_prints_files_and_card(tmp_path):
    d = _tokenizer_folder(tmp_path)
    result = run_cli("vq", "push", d, "--repo", "acme/vqgan-demo", "--dry-run")
    out = result.output
    psnr = json.loads((d / "train_metrics.json").read_text())["eval"]["psnr_db"]
    assert "would upload to acme/vqgan-demo" in out
    for needle in ("config.yaml", "model.safetensors", "train_metrics.json", "README.md",
                   "Codebook: 4096 codes of dimension 4", "Downsampling factor f: 8", "ch_mult [1, 2, 2, 4]",
                   f"{psnr:.2f} dB", "13 images", "--vq hf://acme/vqgan-demo"):
        assert needle in out, needle


class FakeApi:
    """Records what push asks of the Hub."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, repo_id, operations, **kw):
        self.calls.append(("create_commit", repo_id, list(operations), kw))
        return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()


def test_push_uploads_one_commit_through_hfapi(tmp_path):
    d = _tokenizer_folder(tmp_path)
    api = FakeApi()
    plan = push(d, "acme/vqgan-demo", private=True, api=api)
    (_, repo, kw), (_, repo2, ops, kw2) = api.calls
    assert repo == repo2 == "acme/vqgan-demo" and kw["private"] is True and kw["exist_ok"] is True
    assert sorted(op.path_in_repo for op in ops) == ["README.md", "config.yaml", "model.safetensors",
                                                     "train_metrics.json"]
    card = next(op for op in ops if op.path_in_repo == "README.md").path_or_fileobj
    assert b"4096 codes" in card and plan["url"].endswith("/commit/abc")
    weights = next(op for op in ops if op.path_in_repo == "model.safetensors")
    assert weights.path_or_fileobj == str(d / "model.safetensors")


def test_push_refuses_pickles_and_broken_folders(tmp_path):
    d = _tokenizer_folder(tmp_path)
    torch.save({"state_dict": {}}, d / "last.ckpt")
    with pytest.raises(TokenizerError, match="never uploaded.*already has its safetensors.*move the pickle out"):
        push(d, "acme/x", dry_run=True, api=FakeApi())
    result = run_cli("vq", "push", d, "--repo", "acme/x", "--dry-run", expect=2)
    assert "move the pickle out" in result.output and "Traceback" not in result.output
    (d / "last.ckpt").unlink()
    (d / "config.yaml").write_text(taming_yaml())  # a yaml that does not fit the weights
    with pytest.raises(TokenizerError, match="do not match"):
        push(d, "acme/x", dry_run=True)
    with pytest.raises(TokenizerError, match="not a folder"):
        push(tmp_path / "nope", "acme/x", dry_run=True)


def test_vq_list_names_sources_and_cache_state(offline, tmp_path):
    rows = {r["name"]: r for r in json.loads(run_cli("vq", "list", "--json").output)}
    assert {"demo", "vqgan-4096", "taming-imagenet-f16-1024", "taming-imagenet-f16-16384", "ldm-vq-f4", "ldm-vq-f8",
            "ldm-vq-f8-n256", "boris-vqgan-f16-16384"} <= set(rows)
    assert rows["demo"]["local"] is True and rows["boris-vqgan-f16-16384"]["local"] is False
    assert (rows["ldm-vq-f8"]["codes"], rows["ldm-vq-f8"]["f"], rows["ldm-vq-f8"]["embed_dim"]) == (16384, 8, 4)
    assert rows["ldm-vq-f4"]["kind"] == "url" and rows["boris-vqgan-f16-16384"]["source"] == "boris/vqgan_f16_16384"
    # once the Hub checkpoint is in the cache, it is listed as local
    ck, yml = tmp_path / "model.ckpt", tmp_path / "config.yaml"
    torch.save({"state_dict": {}}, ck)
    yml.write_text(taming_yaml())
    hub_cache(offline, "boris/vqgan_f16_16384", {"model.ckpt": ck, "config.yaml": yml})
    rows = {r["name"]: r for r in json.loads(run_cli("vq", "list", "--json").output)}
    assert rows["boris-vqgan-f16-16384"]["local"] is True
    text = run_cli("vq", "list").output
    assert "plain URL (not the Hub): https://ommer-lab.com/files/latent-diffusion/vq-f8-n256.zip" in text
    # a plain-URL tokenizer that is not unpacked yet says where to get it and where to put it
    result = run_cli("vq", "info", "ldm-vq-f4", expect=2)
    assert "ommer-lab.com/files/latent-diffusion/vq-f4.zip" in result.output
    assert str(tmp_path / "home" / "tokenizers" / "ldm-vq-f4") in result.output
    # another tokenizer installed under a catalog name is refused on use, so it is not listed as here
    wrong = tmp_path / "home" / "tokenizers" / "ldm-vq-f8"
    wrong.mkdir(parents=True)
    shutil.copy(DEMO_DIR / "model.safetensors", wrong)
    shutil.copy(DEMO_DIR / "config.yaml", wrong)
    rows = {r["name"]: r for r in json.loads(run_cli("vq", "list", "--json").output)}
    assert rows["ldm-vq-f8"]["local"] is False
    assert "describes another tokenizer" in run_cli("vq", "info", "ldm-vq-f8", expect=2).output
    shutil.copytree(wrong, tmp_path / "home" / "tokenizers" / "vqgan-4096")  # the demo has vqgan-4096's geometry
    rows = {r["name"]: r for r in json.loads(run_cli("vq", "list", "--json").output)}
    assert rows["vqgan-4096"]["local"] is True
