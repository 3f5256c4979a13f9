"""`show`, `gallery`, `vq recon`, `vq push` and the tokenizer sources on inputs a user brings:
output paths that cannot be written, moved or embedded images, a run's tokenizer that is not
found from here, captions in the record's own terms, broken texts, bad repo ids and configs."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cogalign.errors import CogalignError
from cogalign.inspect import find_record, targets, view_record
from cogalign.inspect.records import load_manifest
from cogalign.tokenizers import TokenizerError, load_tokenizer
from cogalign.tokenizers.hub import parse_hub_spec, push_plan
from cogalign.tokenizers.presets import DEMO_DIR
from helpers import EXAMPLES, run_cli
from tests.helpers import one_line_error as _one_line_error  # noqa: E402

torch.set_num_threads(1)
SMALL = ["--vq-resolution", "32x64", "--px-resolution", "8x16", "--no-progress", "--workers", "0"]


def _input(folder):
    """Two image records (one not square) and a text-only one, with their images beside them."""
    folder.mkdir()
    shutil.copytree(EXAMPLES.parent / "images", folder / "images",
                    ignore=lambda d, names: [n for n in names if n not in ("chelsea.png", "coffee.png")])
    records = [r for r in json.loads(EXAMPLES.read_text()) if r["id"] in ("chelsea", "coffee", "text_only_haiku")]
    (folder / "in.json").write_text(json.dumps(records))
    return folder / "in.json"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("edges")
    src = _input(root / "src")
    run_cli("expand", src, "--out", root / "out", *SMALL)
    return root / "out"


def test_out_paths_that_cannot_be_written_are_one_line_errors(run, tmp_path):
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    a_dir = tmp_path / "d.png"
    a_dir.mkdir()
    image = EXAMPLES.parent / "images" / "coffee.png"
    for args in (["show", run, "--id", "coffee"], ["vq", "recon", image, "--resolution", "16"]):
        _one_line_error(run_cli(*args, "--out", a_file / "x.png", expect=2), f"{a_file} is a file")
        _one_line_error(run_cli(*args, "--out", a_dir, expect=2), "is a folder")
    _one_line_error(run_cli("gallery", run, "--out", a_file / "g", "--no-progress", expect=2), f"{a_file} is a file")


def test_moved_images_name_the_record_and_the_fix(run, tmp_path):
    res = run_cli("show", run, "--id", "coffee", "--out", tmp_path / "x.png", "--image-root", tmp_path, expect=2)
    _one_line_error(res, "record 'coffee'", "image_missing", "--image-root")
    res = run_cli("gallery", run, "--out", tmp_path / "g", "--image-root", tmp_path, "--no-progress", expect=2)
    _one_line_error(res, "none of the 2 sampled records could be drawn (image_missing: 2)",
                    "first: record 'chelsea': image_missing", "--image-root")


def test_show_draws_embedded_images_without_the_files(tmp_path):
    src = _input(tmp_path / "src")
    run_cli("expand", src, "--out", tmp_path / "out", *SMALL, "--embed-images")
    shutil.rmtree(tmp_path / "src" / "images")
    res = run_cli("show", tmp_path / "out", "--id", "chelsea", "--out", tmp_path / "c.png")
    assert "PSNR exact (inf dB)" in res.output and (tmp_path / "c.png").is_file()


def test_the_runs_own_tokenizer_not_found_from_here_says_where_it_came_from(run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(run, out)
    manifest = json.loads((out / "cogalign.json").read_text())
    manifest["options"]["vq"] = "relative/tok"  # a --vq path relative to where the run was started
    (out / "cogalign.json").write_text(json.dumps(manifest))
    res = run_cli("show", out, "--id", "coffee", "--out", tmp_path / "x.png", expect=2)
    _one_line_error(res, "cogalign.json", "relative/tok", "pass the tokenizer the run used with --vq")
    assert "PSNR" in run_cli("show", out, "--id", "coffee", "--out", tmp_path / "x.png", "--vq", "demo").output


def test_captions_state_the_box_and_the_resolution_as_the_text_does(run):
    record = find_record(run, "chelsea")
    view = view_record(record, load_manifest(run), None)
    regions = [p for p in view.panels if p.title.startswith("region")]
    for t, panel in zip(sorted(targets(record), key=lambda t: t.kind != "vq"), regions):
        h, w = t.meta["resolution"]
        assert f"[3, {h}, {w}]" in panel.caption and f"[3, {h}, {w}]" in t.question  # HxW as the text states it
        x0, y0, x1, y1 = t.meta["box"]
        assert f"({x0}, {y0}, {x1}, {y1})" in panel.caption and f"h {y1 - y0} x w {x1 - x0}" in panel.caption


def test_a_broken_target_text_names_the_record(run):
    record = find_record(run, "coffee")
    for turn in record["conversations"]:
        if turn["value"].startswith("<vq start>"):
            turn["value"] = "<vq start>12, x<vq end>"
    with pytest.raises(CogalignError, match="record 'coffee': the VQ answer does not parse"):
        view_record(record, load_manifest(run), None)


def test_missing_index_in_an_unfinished_run_says_so(tmp_path):
    src = _input(tmp_path / "src")
    run_cli("expand", src, "--out", tmp_path / "out", *SMALL)
    (tmp_path / "out" / "report.json").unlink()
    res = run_cli("show", tmp_path / "out", "--index", "7", "--out", tmp_path / "x.png", expect=2)
    _one_line_error(res, "no record with index 7", "report.json is not written")


def test_recon_reports_hxw_and_refuses_non_images(tmp_path):
    image = EXAMPLES.parent / "images" / "coffee.png"
    res = run_cli("vq", "recon", image, "--out", tmp_path / "r.png", "--resolution", "8x16")
    assert "8x16 (HxW), 2 indices" in res.output
    junk = tmp_path / "notes.png"
    junk.write_text("not an image")
    _one_line_error(run_cli("vq", "recon", junk, "--out", tmp_path / "r2.png", expect=2),
                    "image_unidentified", "pass an image file")


def test_push_names_a_nested_pickle_by_its_path(tmp_path):
    folder = tmp_path / "tok"
    shutil.copytree(DEMO_DIR, folder)
    (folder / "ckpts").mkdir()
    (folder / "ckpts" / "last.ckpt").write_bytes(b"\x80\x04N.")
    with pytest.raises(TokenizerError) as ei:
        push_plan(folder, "me/tok")
    assert "(ckpts/last.ckpt)" in str(ei.value) and "move the pickle out" in str(ei.value)
    (folder / "model.safetensors").unlink()  # no weights beside it: convert it, to a new file
    with pytest.raises(TokenizerError) as ei:
        push_plan(folder, "me/tok")
    assert f"cogalign vq convert {folder / 'ckpts' / 'last.ckpt'} {folder / 'ckpts' / 'last.safetensors'}" in str(ei.value)


@pytest.mark.parametrize("repo", ["bad name/x", "-me/tok", "me/tok!"])
def test_invalid_repo_ids_are_refused_before_any_work(repo, tmp_path):
    with pytest.raises(TokenizerError, match="not a valid Hub repo id"):
        parse_hub_spec("hf://" + repo)
    res = run_cli("vq", "push", DEMO_DIR, "--repo", repo, "--dry-run", expect=2)
    _one_line_error(res, "not a valid Hub repo id")


def test_vqgan_4096_folder_without_weights_does_not_hide_the_hub_repo(tmp_path, monkeypatch):
    from test_hub import hub_cache

    cache = tmp_path / "hf"
    hub_cache(cache, "me/vqgan", {"model.safetensors": DEMO_DIR / "model.safetensors",
                                  "config.yaml": DEMO_DIR / "config.yaml"})
    home = tmp_path / "home"
    (home / "tokenizers" / "vqgan-4096" / "ckpts").mkdir(parents=True)
    (home / "tokenizers" / "vqgan-4096" / "notes.txt").write_text("to do: train")
    for k, v in {"HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1", "COGALIGN_HOME": home, "COGALIGN_VQGAN_4096": "me/vqgan"}.items():
        monkeypatch.setenv(k, str(v))
    assert load_tokenizer("vqgan-4096").content_hash == load_tokenizer("demo").content_hash
    monkeypatch.delenv("COGALIGN_VQGAN_4096")
    with pytest.raises(TokenizerError, match="vqgan-4096 is not installed"):
        load_tokenizer("vqgan-4096")


def test_show_of_a_vqgan_4096_run_from_the_hub_uses_the_commit_it_recorded(run, tmp_path, monkeypatch):
    """A run with --vq vqgan-4096 found through $COGALIGN_VQGAN_4096 records `vqgan-4096 (OWNER/REPO@COMMIT)`;
    show/gallery load that commit, as for an hf:// run: not 'vqgan-4096 is not installed' where the
    variable is not set, and not wherever the repo's branch points now."""
    from test_hub import hub_cache

    sha = "a" * 40
    cache, home = tmp_path / "hf", tmp_path / "home"
    hub_cache(cache, "me/vqgan", {"model.safetensors": DEMO_DIR / "model.safetensors",
                                  "config.yaml": DEMO_DIR / "config.yaml"}, rev=sha, branch="old")
    for k, v in {"HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1", "COGALIGN_HOME": home}.items():
        monkeypatch.setenv(k, str(v))
    monkeypatch.delenv("COGALIGN_VQGAN_4096", raising=False)
    out = tmp_path / "copy"
    shutil.copytree(run, out)
    manifest = json.loads((out / "cogalign.json").read_text())
    manifest["options"].update(vq="vqgan-4096", tokenizer_name=f"vqgan-4096 (me/vqgan@{sha})")
    (out / "cogalign.json").write_text(json.dumps(manifest))
    res = run_cli("show", out, "--id", "coffee", "--out", tmp_path / "x.png")
    assert "PSNR" in res.output and "warning" not in res.output, res.output


@pytest.mark.parametrize("text", ["tokenizers: [me/vqgan]", "- me/vqgan", "tokenizers: me/vqgan"])
def test_config_file_of_the_wrong_shape_is_one_line(text, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.yaml").write_text(text)
    monkeypatch.setenv("COGALIGN_HOME", str(home))
    monkeypatch.delenv("COGALIGN_VQGAN_4096", raising=False)
    with pytest.raises(TokenizerError, match="config.yaml: expected a mapping"):
        load_tokenizer("vqgan-4096")
    _one_line_error(run_cli("vq", "list", expect=2), "config.yaml")


def test_show_draws_images_embedded_in_a_parquet_input(tmp_path, monkeypatch):
    """A Hub parquet input carries its images; the output keeps only their names. `show` finds
    the bytes in the input (given relative to where the run started), from another folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [r for r in json.loads(EXAMPLES.read_text()) if r["id"] in ("chelsea", "coffee")]
    rows = [{"id": r["id"], "conversations": r["conversations"],
             "image": {"bytes": (EXAMPLES.parent / r["image"]).read_bytes(), "path": r["image"].split("/")[-1]}}
            for r in records]
    (tmp_path / "hub" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "hub" / "data" / "train-00000-of-00001.parquet")
    monkeypatch.chdir(tmp_path)
    run_cli("expand", "hub", "--out", "out", *SMALL)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    res = run_cli("show", tmp_path / "out", "--id", "coffee", "--out", "c.png")
    assert "PSNR exact (inf dB)" in res.output
    record = find_record(tmp_path / "out", "coffee")
    view = view_record(record, load_manifest(tmp_path / "out"), None)
    t = sorted(targets(record), key=lambda t: t.kind != "vq")[0]  # the panels' order: VQ first
    h, w = t.meta["resolution"]
    with Image.open(EXAMPLES.parent / "images" / "coffee.png") as im:
        full = np.asarray(im.convert("RGB").resize((w, h), Image.BICUBIC))
    x0, y0, x1, y1 = t.meta["box"]
    np.testing.assert_array_equal(view.panels[0].pixels, full[y0:y1, x0:x1])


def test_gallery_does_not_overwrite_someone_elses_index_html(run, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<html><title>my homepage</title></html>")
    _one_line_error(run_cli("gallery", run, "--out", site, "--no-progress", expect=2), "not a cogalign gallery")
    assert "my homepage" in (site / "index.html").read_text()
    run_cli("gallery", run, "--out", tmp_path / "g", "--n", "1", "--no-progress")
    run_cli("gallery", run, "--out", tmp_path / "g", "--n", "1", "--no-progress")  # its own page is replaced


def test_gallery_never_deletes_or_replaces_pngs_it_did_not_write(run, tmp_path):
    site = tmp_path / "site"
    (site / "img").mkdir(parents=True)
    (site / "img" / "recipe.png").write_text("my recipe")  # rec*.png, not a panel name
    run_cli("gallery", run, "--out", site, "--n", "1", "--no-progress")
    assert (site / "img" / "recipe.png").read_text() == "my recipe"
    mine = tmp_path / "mine"
    (mine / "img").mkdir(parents=True)
    (mine / "img" / "rec000_0.png").write_text("my photo")
    _one_line_error(run_cli("gallery", run, "--out", mine, "--n", "1", "--no-progress", expect=2),
                    "rec000_0.png", "did not write")
    assert (mine / "img" / "rec000_0.png").read_text() == "my photo"
    run_cli("gallery", run, "--out", site, "--n", "1", "--no-progress")  # its own panels are replaced


def test_show_and_gallery_refuse_an_out_inside_the_run_folder(run, tmp_path):
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    _one_line_error(run_cli("gallery", run, "--out", run, "--n", "1", "--no-progress", expect=2), "inside the output folder")
    _one_line_error(run_cli("show", run, "--index", "0", "--out", run / "data" / "x.png", expect=2), "inside the output folder")
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


@pytest.mark.parametrize("embed", [False, True])
def test_show_draws_a_record_with_several_images_from_its_first(tmp_path, embed):
    """expand cuts a list `image`'s targets from its first image; show reads that one (it failed as
    image_bad_type, telling the user to restore a file that was never changed)."""
    src = _input(tmp_path / "src")
    records = json.loads(src.read_text())
    records[0]["image"] = ["images/chelsea.png", "images/coffee.png"]
    records[0]["conversations"][0]["value"] = "<image>\n<image>\n" + records[0]["conversations"][0]["value"].replace("<image>", "").strip()
    src.write_text(json.dumps(records))
    run_cli("expand", src, "--out", tmp_path / "out", *SMALL, *(["--embed-images"] if embed else []))
    res = run_cli("show", tmp_path / "out", "--id", records[0]["id"], "--out", tmp_path / "m.png")
    assert "RGB text, drawn: PSNR exact (inf dB)" in res.output and (tmp_path / "m.png").is_file()


def test_a_shard_changed_after_the_run_is_one_line_in_every_command(run, tmp_path):
    """A shard replaced by another file (here: a predictions file written over it) used to end show, gallery,
    merge-report, export, stats and train in a pyarrow traceback."""
    out = tmp_path / "out"
    shutil.copytree(run, out)
    shard = next((out / "data").glob("*.parquet"))
    shard.write_text('{"id": "chelsea", "text": "x"}\n')
    for args in (["show", out, "--id", "coffee", "--out", tmp_path / "x.png"], ["gallery", out, "--out", tmp_path / "g",
                 "--no-progress"], ["merge-report", out], ["export", out, "--to", "sharegpt", "--out", tmp_path / "e.json"],
                 ["stats", out]):
        _one_line_error(run_cli(*args, expect=2), shard.name, "not a readable parquet shard",
                        "rerun the `cogalign expand` command with --overwrite")


def test_a_jsonl_shard_changed_after_the_run_names_the_line(tmp_path):
    src = _input(tmp_path / "src")
    run_cli("expand", src, "--out", tmp_path / "out", *SMALL, "--format", "jsonl")
    shard = next((tmp_path / "out" / "data").glob("*.jsonl"))
    with open(shard, "a") as f:
        f.write("half a record {\n")
    for args in (["stats", tmp_path / "out"], ["export", tmp_path / "out", "--to", "messages", "--out", tmp_path / "e.jsonl"],
                 ["gallery", tmp_path / "out", "--out", tmp_path / "g", "--no-progress"]):
        _one_line_error(run_cli(*args, expect=2), shard.name, "line 4 is not JSON", "--overwrite")
