"""Outside check (c3) of the tokenizer commands: no command replaces a file it did not write
(`vq recon --out`, `vq convert`'s yaml, `vq train --force`), and a push that cannot reach the Hub
is one line."""
from __future__ import annotations

import shutil

import pytest
import torch
from typer.testing import CliRunner

from cogalign.cli import app
from cogalign.tokenizers import TokenizerError
from cogalign.tokenizers.presets import DEMO_DIR
from tokenizer_fixtures import EXAMPLE_IMAGES, lightning_checkpoint, make_random_taming_state, taming_yaml
from tests.helpers import one_line_error as _one_line_error  # noqa: E402

torch.set_num_threads(1)


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_recon_never_replaces_its_input_and_an_existing_file_only_with_overwrite(tmp_path):
    image = tmp_path / "coffee.png"
    shutil.copyfile(EXAMPLE_IMAGES / "coffee.png", image)
    before = image.read_bytes()
    for extra in ([], ["--overwrite"]):
        _one_line_error(_cli("vq", "recon", image, "--out", image, "--resolution", "16", *extra), "input image")
        assert image.read_bytes() == before
    theirs = tmp_path / "theirs.png"
    theirs.write_bytes(b"someone else's file")
    _one_line_error(_cli("vq", "recon", image, "--out", theirs, "--resolution", "16"), "--overwrite")
    assert theirs.read_bytes() == b"someone else's file"
    r = _cli("vq", "recon", image, "--out", theirs, "--resolution", "16", "--overwrite")
    assert r.exit_code == 0, r.output
    assert theirs.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _ckpt(folder):
    from tokenizer_fixtures import TINY_PARAMS

    folder.mkdir()
    torch.save(lightning_checkpoint(make_random_taming_state(TINY_PARAMS)), folder / "last.ckpt")
    (folder / "config.yaml").write_text(taming_yaml())
    return folder / "last.ckpt"


def test_convert_never_replaces_a_yaml_it_did_not_write(tmp_path):
    ckpt = _ckpt(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "tok.yaml").write_text("mine: true\n")
    r = _cli("vq", "convert", ckpt, out / "tok.safetensors")
    _one_line_error(r, "tok.yaml", "never replaced")
    assert (out / "tok.yaml").read_text() == "mine: true\n" and not (out / "tok.safetensors").exists()
    # the same yaml there already, or a second convert (--force) over its own pair: fine
    (out / "tok.yaml").write_text(taming_yaml())
    assert _cli("vq", "convert", ckpt, out / "tok.safetensors").exit_code == 0
    assert _cli("vq", "convert", ckpt, out / "tok.safetensors", "--force").exit_code == 0


def test_train_force_keeps_files_that_vq_train_did_not_write(tmp_path):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "config.yaml").write_text("my: experiment\n")
    (out / "train_metrics.json").write_text('{"mine": 1}')
    r = _cli("vq", "train", EXAMPLE_IMAGES / "chelsea.png", "--out", out, "--steps", "1", "--crop", "32",
             "--batch-size", "1", "--codes", "16", "--no-progress", "--no-eval", "--force")
    _one_line_error(r, "config.yaml", "train_metrics.json", "did not write")
    assert (out / "config.yaml").read_text() == "my: experiment\n"
    assert (out / "train_metrics.json").read_text() == '{"mine": 1}'


class _Unreachable:
    def __init__(self, exc):
        self.exc = exc

    def create_repo(self, *a, **kw):
        raise self.exc


@pytest.mark.parametrize("exc", ["offline", "connect", "os"])
def test_push_that_cannot_reach_the_hub_is_one_error(tmp_path, exc):
    import httpx2 as httpx
    from huggingface_hub.errors import OfflineModeIsEnabled

    from cogalign.tokenizers.hub import push

    folder = tmp_path / "tok"
    shutil.copytree(DEMO_DIR, folder)
    raised = {"offline": OfflineModeIsEnabled("offline mode is enabled"),
              "connect": httpx.ConnectError("Name or service not known"), "os": OSError("no route")}[exc]
    with pytest.raises(TokenizerError) as ei:
        push(folder, "me/tok", api=_Unreachable(raised))
    assert "the Hub cannot be reached" in str(ei.value) and "\n" not in str(ei.value)


def test_a_resolution_beyond_memory_is_refused_before_allocating(tmp_path):
    """The middle block's attention over (8192/8)² positions alone needs ~4 TiB: one line, not a
    MemoryError traceback after minutes."""
    image = EXAMPLE_IMAGES / "coffee.png"
    _one_line_error(_cli("vq", "recon", image, "--out", tmp_path / "r.png", "--resolution", "8192"),
                    "--resolution 8192x8192", "GiB", "use a smaller --resolution")
    for flag in ("--resolution", "--usage-resolution"):
        _one_line_error(_cli("vq", "eval", "demo", image, "--no-progress", flag, "65536"), f"{flag} 65536x65536", "GiB")
    assert not (tmp_path / "r.png").exists()


def test_a_diverged_run_stops_in_one_line_and_writes_no_model_of_nans(tmp_path):
    """--lr 1e30: the loss is NaN from the second step on. Before, the run went on and wrote a
    model.safetensors of NaNs, a train_metrics.json holding NaN (not JSON) and an eval PSNR."""
    out = tmp_path / "tok"
    r = _cli("vq", "train", EXAMPLE_IMAGES / "chelsea.png", "--out", out, "--steps", "4", "--crop", "32",
             "--batch-size", "1", "--codes", "16", "--kmeans-latents", "16", "--lr", "1e30", "--no-progress")
    lines = [line for line in r.output.splitlines() if line.startswith("error")]
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert "diverged" in lines[0] and "--lr" in lines[0]
    assert not (out / "model.safetensors").exists() and not (out / "train_metrics.json").exists()


def test_train_reads_the_codebook_size_of_the_run_not_the_names_last_digits(tmp_path):
    """`cogalign train --vq-tokens special` sized the new vocabulary from the tokenizer name's last
    digits: 8 for ldm-vq-f8 (16384 codes), 1234567 for alice/tok@…01234567, 2 for a folder tok_v2."""
    import json

    from cogalign.tokenizers import load_tokenizer
    from cogalign.train.model import codebook_size

    folder = tmp_path / "tok_v2"
    shutil.copytree(DEMO_DIR, folder)
    demo_hash = load_tokenizer("demo").content_hash

    def size(name, vq, tok_hash=demo_hash):
        run = tmp_path / f"run_{len(list(tmp_path.iterdir()))}"
        run.mkdir()
        (run / "cogalign.json").write_text(json.dumps(
            {"options": {"tokenizer_name": name, "vq": vq, "tokenizer_hash": tok_hash}}))
        return codebook_size(run)

    assert size("ldm-vq-f8", "ldm-vq-f8", "x") == 16384
    assert size("demo-f8-4096", "demo") == 4096
    assert size("tok_v2", str(folder)) == 4096
    assert size("alice/tok@0123456789abcdef0123456789abcdef01234567", str(folder)) == 4096
    assert size("tok_v2", str(folder), tok_hash="another") is None  # not the run's tokenizer: unknown
    assert size("alice/tok@0123456789abcdef0123456789abcdef01234567", str(tmp_path / "gone")) is None


def test_push_card_names_the_files_it_uploads(tmp_path):
    """A `vq convert` output is `<stem>.safetensors` + `<stem>.yaml`; the card said `config.yaml`."""
    from cogalign.tokenizers.hub import push_plan

    ckpt = _ckpt(tmp_path / "src")
    assert _cli("vq", "convert", ckpt, tmp_path / "tok" / "f16.safetensors").exit_code == 0
    files, card = push_plan(tmp_path / "tok", "me/tok")
    assert sorted(p.name for p in files) == ["f16.safetensors", "f16.yaml"]
    assert "`f16.yaml` (the taming model config) and `f16.safetensors`" in card and "config.yaml" not in card


def test_gumbel_model_says_why_it_has_no_psnr(tmp_path):
    """A Gumbel checkpoint holds a decoder, but its indices are not decoded: `vq eval` said "no decoder
    in the checkpoint" and `vq convert` promised that "vq eval can report PSNR"."""
    from tokenizer_fixtures import TINY_PARAMS

    params = dict(TINY_PARAMS, n_embed=64)
    src = tmp_path / "src"
    src.mkdir()
    torch.save({"state_dict": make_random_taming_state(params, gumbel=True)}, src / "last.ckpt")
    (src / "config.yaml").write_text(taming_yaml(params, target="taming.models.vqgan.GumbelVQ"))
    r = _cli("vq", "convert", src / "last.ckpt", tmp_path / "tok" / "g.safetensors")
    assert r.exit_code == 0 and "vq eval can report PSNR" not in r.output and "Gumbel" in r.output, r.output
    r = _cli("vq", "eval", tmp_path / "tok", EXAMPLE_IMAGES / "coffee.png", "--no-progress",
             "--resolution", "32", "--usage-resolution", "32")
    assert r.exit_code == 0, r.output
    assert "no decoder in the checkpoint" not in r.output and "psnr at 32px: n/a (a Gumbel model" in r.output


def test_show_decodes_with_the_commit_the_run_used_not_the_branch_now(tmp_path, monkeypatch, capsys):
    """A run made with `--vq hf://me/tok` records me/tok@SHA1; after main moves to SHA2 (another
    tokenizer), show/gallery loaded SHA2 and warned that it is not the run's tokenizer."""
    from cogalign.cli.inspect import _decoder
    from cogalign.tokenizers import load_tokenizer
    from tokenizer_fixtures import TINY_PARAMS

    sha1, sha2 = "1" * 40, "2" * 40
    repo = tmp_path / "hf" / "models--me--tok"
    shutil.copytree(DEMO_DIR, repo / "snapshots" / sha1)
    (repo / "snapshots" / sha2).mkdir(parents=True)
    params = dict(TINY_PARAMS, n_embed=64)
    from safetensors.torch import save_file

    save_file(make_random_taming_state(params), str(repo / "snapshots" / sha2 / "model.safetensors"))
    (repo / "snapshots" / sha2 / "config.yaml").write_text(taming_yaml(params))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha2)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    opts = {"vq": "hf://me/tok", "tokenizer_name": f"me/tok@{sha1}", "targets": ["vq"],
            "tokenizer_hash": load_tokenizer("demo").content_hash}
    decoder = _decoder(tmp_path, {"options": opts}, None, False)
    assert decoder is not None and "not the one this run used" not in capsys.readouterr().err


def test_two_checkpoints_suggest_the_safetensors_not_the_pickle(tmp_path):
    """`vq convert src/last.ckpt src/model.safetensors` leaves both in src; the error suggested the
    pickle (which is refused without --trust-pickle when it holds objects) instead of the converted file."""
    ckpt = _ckpt(tmp_path / "src")
    assert _cli("vq", "convert", ckpt, tmp_path / "src" / "model.safetensors").exit_code == 0
    _one_line_error(_cli("vq", "info", tmp_path / "src"), "2 checkpoints found",
                    f"e.g. {tmp_path / 'src' / 'model.safetensors'}")


def test_push_refuses_an_unreadable_train_metrics(tmp_path):
    """It was uploaded as is, and the card said "no train_metrics.json in the folder"."""
    from cogalign.tokenizers.hub import push_plan

    folder = tmp_path / "tok"
    shutil.copytree(DEMO_DIR, folder)
    (folder / "train_metrics.json").write_text('{"images": 4, "steps": ')
    with pytest.raises(TokenizerError) as ei:
        push_plan(folder, "me/tok")
    assert "train_metrics.json: not readable JSON" in str(ei.value) and "\n" not in str(ei.value)


def _llava(tmp_path, absolute):
    import json

    recs = [{"id": n, "image": str(EXAMPLE_IMAGES / n) if absolute else f"images/{n}",
             "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A."}]}
            for n in ("chelsea.png", "coffee.png")]
    path = tmp_path / ("abs.json" if absolute else "rel.json")
    path.write_text(json.dumps(recs))
    return path


def test_absolute_paths_reach_eval_and_the_eval_after_training(tmp_path):
    """`vq train --allow-absolute-paths` trained, then its own eval refused the same input (exit 2
    after the model was written); `vq eval` had no such flag, and its error did not name one."""
    data = _llava(tmp_path, absolute=True)
    small = ["--resolution", "32", "--usage-resolution", "32", "--no-progress"]
    _one_line_error(_cli("vq", "eval", "demo", data, *small), "--allow-absolute-paths")
    r = _cli("vq", "eval", "demo", data, *small, "--allow-absolute-paths")
    assert r.exit_code == 0 and "images: 2" in r.output, r.output
    r = _cli("vq", "train", data, "--allow-absolute-paths", "--out", tmp_path / "tok", "--steps", "1", "--crop", "32",
             "--batch-size", "1", "--codes", "16", "--kmeans-latents", "16", "--no-progress")
    assert r.exit_code == 0 and "eval: PSNR" in r.output, r.output


def test_an_image_root_through_a_symlink_says_what_to_pass(tmp_path):
    data = _llava(tmp_path, absolute=False)
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "images").symlink_to(EXAMPLE_IMAGES)
    r = _cli("vq", "eval", "demo", data, "--image-root", tmp_path / "root", "--no-progress")
    _one_line_error(r, "image_path_escapes_root: 2", "symlink", "pass the folder that really holds the images")


def test_eval_means_count_every_image_of_a_llava_input_alike(tmp_path):
    """LLaVA inputs reuse images across records: PSNR was averaged over distinct paths while SSIM,
    the image count and the codebook counts took every record."""
    import json

    conv = [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]
    recs = [{"id": str(i), "image": str(EXAMPLE_IMAGES / n), "conversations": conv}
            for i, n in enumerate(["coffee.png", "coffee.png", "chelsea.png"])]
    (tmp_path / "dup.json").write_text(json.dumps(recs))
    r = _cli("vq", "eval", "demo", tmp_path / "dup.json", "--allow-absolute-paths", "--resolution", "32",
             "--usage-resolution", "32", "--no-progress", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    per = res["psnr_db_per_image"]
    want = (2 * per[str(EXAMPLE_IMAGES / "coffee.png")] + per[str(EXAMPLE_IMAGES / "chelsea.png")]) / 3
    assert res["images"] == 3 and abs(res["psnr_db"] - want) < 0.01
