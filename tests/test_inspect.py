"""Targets a person can see: the decoder, `show`, `gallery` (checked in a real headless Chromium)
and `vq recon`."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from cogalign.inspect import find_record, targets, view_record
from cogalign.inspect.panels import PANEL, display, panel_origin
from cogalign.inspect.records import load_manifest
from cogalign.targets.render import parse_vq
from cogalign.tokenizers import load_tokenizer
from cogalign.tokenizers.decoder import load_decoder
from cogalign.tokenizers.presets import load_decoder_spec
from helpers import EXAMPLES, FAST, run_cli
from tokenizer_fixtures import TINY_PARAMS, make_random_taming_state, photos, taming_yaml

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect") / "out"
    run_cli("expand", EXAMPLES, "--out", out, "--workers", "0", *FAST)
    return out


@pytest.fixture(scope="module")
def decoder():
    return load_decoder_spec("demo")


def _region_from_scratch(record: dict, meta: dict) -> np.ndarray:
    """The region as the spec defines it, computed here without cogalign: PIL bicubic stretch, crop."""
    h, w = meta["resolution"]
    with Image.open(EXAMPLES.parent / record["image"]) as im:
        arr = np.asarray(im.convert("RGB").resize((w, h), Image.BICUBIC))
    x0, y0, x1, y1 = meta["box"]
    return arr[y0:y1, x0:x1]


def test_decoder_matches_taming_reconstruction(tmp_path):
    """decode(indices) equals taming's own Decoder(post_quant_conv(codebook[indices]))."""
    from taming.modules.diffusionmodules.model import Decoder

    sd = make_random_taming_state(TINY_PARAMS, seed=1)
    from safetensors.torch import save_file

    save_file(sd, str(tmp_path / "m.safetensors"))
    (tmp_path / "m.yaml").write_text(taming_yaml())
    dec = load_decoder(tmp_path)
    idx = np.random.default_rng(0).integers(0, TINY_PARAMS["n_embed"], size=(2, 3, 5))
    dd = TINY_PARAMS["ddconfig"]
    ref = Decoder(**dd).eval()
    ref.load_state_dict({k[len("decoder."):]: v for k, v in sd.items() if k.startswith("decoder.")})
    pqc = torch.nn.Conv2d(TINY_PARAMS["embed_dim"], dd["z_channels"], 1)
    pqc.load_state_dict({k[len("post_quant_conv."):]: v for k, v in sd.items() if k.startswith("post_quant_conv.")})
    with torch.no_grad():
        q = sd["quantize.embedding.weight"][torch.from_numpy(idx)].permute(0, 3, 1, 2)
        x = ref(pqc(q))
    want = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    got = dec.decode(idx)
    assert got.shape == (2, 24, 40, 3)
    # float32 summation order (threads, memory layout) may move a value across a rounding edge
    diff = np.abs(got.astype(int) - want)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.005
    np.testing.assert_array_equal(dec.decode(idx[1]), got[1])
    with pytest.raises(Exception, match="outside the codebook"):
        dec.decode(np.full((2, 2), TINY_PARAMS["n_embed"]))


def test_demo_reconstruction_is_an_image_not_noise(decoder):
    tok = load_tokenizer("demo")
    x = photos((128, 128), ["chelsea.png", "coffee.png"])
    rec = decoder.decode(tok.encode(x))
    mse = np.mean((rec.astype(float) - x) ** 2, axis=(1, 2, 3))
    psnr = 10 * np.log10(255 ** 2 / mse)
    assert (psnr > 20).all(), psnr  # the demo reaches ~24 dB; noise or a wrong decoder is < 12 dB
    shuffled = decoder.decode(np.random.default_rng(0).permutation(tok.encode(x[:1])[0].ravel()).reshape(16, 16))
    assert 10 * np.log10(255 ** 2 / np.mean((shuffled.astype(float) - x[0]) ** 2)) < psnr[0] - 5


def test_show_panels_are_the_decoded_indices_and_the_exact_region(out, decoder, tmp_path):
    manifest = load_manifest(out)
    record = find_record(out, index=1)
    view = view_record(record, manifest, decoder)
    by_kind = {t.kind: t for t in targets(record)}
    assert [p.title for p in view.panels] == ["region (VQ input)", "VQ text, decoded", "region (PX input)",
                                              "RGB text, drawn"]
    vq_region, vq_panel, px_region, px_panel = view.panels
    # the VQ panel is the decoder's output for the indices parsed from the record's text
    vq_meta = by_kind["vq"].meta
    f = decoder.downsample
    bh, bw = vq_meta["box"][3] - vq_meta["box"][1], vq_meta["box"][2] - vq_meta["box"][0]
    idx = parse_vq(by_kind["vq"].answer).reshape(bh // f, bw // f)
    np.testing.assert_array_equal(vq_panel.pixels, decoder.decode(idx))
    # ... and the indices are what the tokenizer makes of that region
    np.testing.assert_array_equal(load_tokenizer("demo").encode(vq_region.pixels[None])[0], idx)
    # the regions are the spec's, and the RGB panel is the region's pixels exactly
    np.testing.assert_array_equal(vq_region.pixels, _region_from_scratch(record, vq_meta))
    np.testing.assert_array_equal(px_region.pixels, _region_from_scratch(record, by_kind["px"].meta))
    np.testing.assert_array_equal(px_panel.pixels, px_region.pixels)
    assert px_panel.psnr_db == float("inf") and 12 < vq_panel.psnr_db < 60

    # the PNG `show` writes holds those panels
    png = tmp_path / "rec.png"
    result = run_cli("show", out, "--id", record["id"], "--out", png)
    assert "PSNR exact (inf dB)" in result.output and f"{vq_panel.psnr_db:.2f} dB" in result.output
    shown = np.asarray(Image.open(png).convert("RGB"))
    for i, panel in enumerate(view.panels):
        im = np.asarray(display(panel.pixels))
        x, y = panel_origin(i, True)
        x += (PANEL - im.shape[1]) // 2
        y += (PANEL - im.shape[0]) // 2
        np.testing.assert_array_equal(shown[y:y + im.shape[0], x:x + im.shape[1]], im)


def test_show_errors_are_one_line(out, tmp_path):
    for args, needle in ((["--index", "999"], "no record with index 999"),
                         (["--id", "text-only-0"], None),
                         ([], "exactly one of --id and --index")):
        result = run_cli("show", out, *args, "--out", tmp_path / "x.png", expect=2)
        assert "Traceback" not in result.output and result.output.startswith("error:")
        if needle:
            assert needle in result.output
    passed = next(r for r in _all(out) if not r.get("cogalign"))
    result = run_cli("show", out, "--id", passed["id"], "--out", tmp_path / "x.png", expect=2)
    assert "passed through" in result.output
    result = run_cli("show", out, "--index", "1", "--out", tmp_path / "x.png", "--image-root", tmp_path, expect=2)
    assert "image" in result.output and "Traceback" not in result.output


def _all(out):
    from cogalign.inspect.records import iter_records

    return list(iter_records(out))


def test_vq_recon_writes_the_decoded_image_and_its_psnr(tmp_path):
    png = tmp_path / "r.png"
    result = run_cli("vq", "recon", EXAMPLES.parent / "images" / "coffee.png", "--out", png, "--resolution", "64")
    psnr = float(re.search(r"PSNR: ([0-9.]+) dB", result.output).group(1))
    x = photos((64, 64), ["coffee.png"])
    want = load_decoder_spec("demo").decode(load_tokenizer("demo").encode(x)[0])
    np.testing.assert_array_equal(np.asarray(Image.open(png)), want)
    assert abs(psnr - 10 * np.log10(255 ** 2 / np.mean((want.astype(float) - x[0]) ** 2))) < 0.01
    bad = run_cli("vq", "recon", EXAMPLES.parent / "images" / "coffee.png", "--out", tmp_path / "r2.png", "--resolution", "60", expect=2)
    assert "multiple of f=8" in bad.output


# ---------------------------------------------------------------------------------------
# The gallery, in a real browser
# ---------------------------------------------------------------------------------------

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)

# Appended to a copy of the page (same folder, same images): after load, write each image's
# natural size into the DOM, which --dump-dom prints.
PROBE = """<script>window.addEventListener("load", () => {
  const r = [...document.images].map(i => [i.getAttribute("src"), i.complete, i.naturalWidth]);
  const pre = document.createElement("pre"); pre.id = "probe"; pre.textContent = JSON.stringify(r);
  document.body.appendChild(pre); });</script>"""


def _chromium(*args, timeout=120):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--enable-logging=stderr",
           "--v=0", "--virtual-time-budget=5000", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _browser_check(page):
    """(console messages, [(src, complete, naturalWidth)]) of a page loaded in Chromium."""
    probe = page.with_name("_probe_" + page.name)
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    proc = _chromium("--dump-dom", probe.as_uri())
    probe.unlink()
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    found = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, re.S)
    assert found, proc.stdout[-2000:] + proc.stderr[-2000:]
    return console, json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium); .ci/run installs it")
def test_gallery_in_headless_chromium(out, tmp_path):
    # the check itself catches what it must: a console error and an image that does not decode
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "index.html").write_text('<!DOCTYPE html><html><body><img src="img/none.png">'
                                    '<script>console.error("boom")</script></body></html>')
    console, imgs = _browser_check(bad / "index.html")
    assert any("boom" in c for c in console) and imgs == [["img/none.png", True, 0]]

    dest = tmp_path / "gallery"
    result = run_cli("gallery", out, "--out", dest, "--n", "5", "--no-progress")
    assert "records shown: 5" in result.output
    page = (dest / "index.html").read_text(encoding="utf-8")
    assert not re.search(r'(src|href)="(https?:)?//', page)  # no external assets
    report = json.loads((out / "report.json").read_text())
    assert f"<th>input records</th><td>{report['input']}</td>" in page
    assert f"<th>expanded</th><td>{report['expanded']}</td>" in page
    assert "template id" in page and "VQ prompt (template" in page
    console, imgs = _browser_check(dest / "index.html")
    assert console == []
    assert len(imgs) == 20 and all(done and width > 0 for _, done, width in imgs), imgs

    shot = tmp_path / "shot.png"
    proc = _chromium(f"--screenshot={shot}", "--window-size=1100,900", "--hide-scrollbars", (dest / "index.html").as_uri())
    assert shot.is_file(), proc.stderr[-2000:]
    arr = np.asarray(Image.open(shot).convert("RGB")).astype(float)
    assert arr.std() > 20 and len(np.unique(arr.reshape(-1, 3), axis=0)) > 500  # text and photos, not blank


def test_gallery_skips_records_it_cannot_draw(out, tmp_path):
    """issue 15 #19: every record skipped is an error naming the reasons, not an empty page and exit 0."""
    dest = tmp_path / "g"
    result = run_cli("gallery", out, "--out", dest, "--n", "3", "--image-root", tmp_path, "--no-progress", expect=2)
    assert result.output.startswith("error: none of the 3 sampled records could be drawn (image_missing: 3)")
    assert result.output.count("\n") == 1
    assert "Not shown" in (dest / "index.html").read_text()  # the page lists them all the same


def test_show_through_a_folder_of_links_out_of_the_root(out, tmp_path):
    """issue 15 #16: --image-root of symlinks that lead out of it: no advice to pass a flag show and
    gallery do not have, and no claim that the image changed."""
    links = tmp_path / "links"
    (links / "images").mkdir(parents=True)
    for p in (EXAMPLES.parent / "images").iterdir():
        (links / "images" / p.name).symlink_to(p.resolve())
    for cmd in (["show", out, "--index", "0", "--out", tmp_path / "x.png"],
                ["gallery", out, "--out", tmp_path / "g", "--n", "1", "--no-progress"]):
        result = run_cli(*cmd, "--image-root", links, expect=2)
        msg = result.output
        assert "--allow-absolute-paths to" not in msg and "changed" not in msg, msg
        assert "outside the image root" in msg and "pass --image-root with the folder that really holds the images" in msg


def test_gallery_is_deterministic(out, tmp_path):
    pages = []
    for name in ("a", "b"):
        run_cli("gallery", out, "--out", tmp_path / name, "--n", "2", "--no-progress")
        pages.append({p.relative_to(tmp_path / name).as_posix(): p.read_bytes()
                      for p in sorted((tmp_path / name).rglob("*")) if p.is_file()})
    assert pages[0] == pages[1] and len(pages[0]) == 1 + 8


def test_show_without_a_decoder_leaves_the_vq_panel_blank(tmp_path):
    from safetensors.torch import save_file

    sd = make_random_taming_state(TINY_PARAMS, seed=2)
    tok = tmp_path / "encoder-only"
    tok.mkdir()
    save_file({k: v for k, v in sd.items() if k.startswith(("encoder.", "quant_conv.", "quantize."))},
              str(tok / "model.safetensors"))
    (tok / "config.yaml").write_text(taming_yaml())
    run_cli("expand", EXAMPLES, "--out", tmp_path / "o", "--vq", tok, "--workers", "0", *FAST)
    result = run_cli("show", tmp_path / "o", "--id", "coffee", "--out", tmp_path / "c.png")
    assert "holds no decoder.* weights" in result.output and "left blank" in result.output
    assert "PSNR exact (inf dB)" in result.output
