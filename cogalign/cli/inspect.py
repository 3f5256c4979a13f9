"""`cogalign show` and `cogalign gallery`: thin typer commands over cogalign.inspect."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from cogalign.cli.util import check_not_run_file, check_out_parent, check_png_out, fail, save_png, say
from cogalign.errors import CogalignError

OutArg = typer.Argument(..., help="Output folder of `cogalign expand`.", exists=True, file_okay=False)
VqOpt = typer.Option(None, "--vq", help="Tokenizer whose decoder draws the VQ panels. Default: the run's own --vq (from OUT/cogalign.json).")
RootOpt = typer.Option(None, "--image-root", help="Folder the records' image paths are relative to. Default: the run's image root (from OUT/cogalign.json).")
SHOW_MARK = "cogalign show"  # the PNG's Software text: a panel show wrote may be replaced (--overwrite)
TrustOpt = typer.Option(False, "--trust-pickle", help="Allow a checkpoint that unpickles Python objects (runs code from the file). Default: off.")


def _pinned_hub_spec(opts: dict) -> Optional[str]:
    """The run's hf:// tokenizer at the commit it resolved to then (recorded as OWNER/REPO@COMMIT[/SUB]),
    not wherever its branch points now; so is a catalog name the run found on the Hub (recorded as
    `NAME (OWNER/REPO@COMMIT)`: vqgan-4096 through $COGALIGN_VQGAN_4096, boris-vqgan-f16-16384)."""
    import re

    from cogalign.tokenizers.hub import PREFIX, is_hub_spec

    name, vq = str(opts.get("tokenizer_name") or ""), str(opts.get("vq") or "")
    if is_hub_spec(vq) and "@" in name and " " not in name:
        return PREFIX + name
    by_name = re.fullmatch(r"(\S+) \((\S+/\S+@[0-9a-f]{40}\S*)\)", name)
    if by_name and by_name.group(1) == vq:
        return PREFIX + by_name.group(2)
    return None


def _decoder(out: Path, manifest: dict, vq: Optional[str], trust_pickle: bool):
    """The decoder of --vq or of the run's tokenizer; None (VQ panels left blank) for a run without VQ targets."""
    from cogalign.tokenizers import TokenizerError, load_tokenizer
    from cogalign.tokenizers.presets import load_decoder_spec

    opts = manifest.get("options", {})
    if "vq" not in opts.get("targets", ["vq"]) and vq is None:
        return None
    spec = vq or _pinned_hub_spec(opts) or opts.get("vq") or "demo"
    try:
        decoder = load_decoder_spec(spec, trust_pickle=trust_pickle)
    except TokenizerError as e:
        if "decoder" not in str(e) and "Gumbel" not in str(e):
            if vq is None:  # the run's own --vq, which may be a path relative to where the run was started
                raise TokenizerError(f"{out / 'cogalign.json'}: the run's tokenizer --vq {spec} cannot be loaded "
                                     f"here ({e}); pass the tokenizer the run used with --vq") from None
            raise
        say(f"warning: {e}; the VQ panels are left blank")
        return None
    want = opts.get("tokenizer_hash")
    got = load_tokenizer(spec, trust_pickle=trust_pickle).content_hash
    if want and got != want:
        say(f"warning: tokenizer {spec} (hash {got}) is not the one this run used (hash {want}, "
            f"{opts.get('tokenizer_name')}); the VQ panels will not mean much: pass the run's tokenizer with --vq")
    return decoder


def _outside_run(dest: Path, out: Path) -> None:
    """Refuse an --out inside the expand output folder: files there would be taken for part of the
    dataset (`publish --include-all` uploads them; `reset` leaves them)."""
    if dest.resolve().is_relative_to(out.resolve()):
        fail(f"--out {dest}: is inside the output folder {out}; write it outside, e.g. {out.name}-inspect/")


def show(
    out: Path = OutArg,
    record_id: Optional[str] = typer.Option(None, "--id", help="The record's `id` (the first record with it). Give --id or --index."),
    index: Optional[int] = typer.Option(None, "--index", min=0, help="The record's position in the input file (0-based). Give --id or --index."),
    dest: Path = typer.Option(..., "--out", "-o", help="PNG file to write, outside OUT. An existing file is replaced only with --overwrite; the run's input and images never."),
    vq: Optional[str] = VqOpt,
    image_root: Optional[Path] = RootOpt,
    trust_pickle: bool = TrustOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file (never the run's input or an image under its image root). Default: off (refused)."),
) -> None:
    """Draw one record's targets side by side in a PNG, with PSNRs.

    Panels: the region as the model saw it, the VQ indices decoded by the tokenizer's decoder, the RGB dump drawn; each with its PSNR against the region."""
    from cogalign.inspect.panels import compose, fmt_psnr, view_record
    from cogalign.inspect.records import find_record, load_manifest

    check_png_out(dest, overwrite)
    _outside_run(dest, out)
    try:
        manifest = load_manifest(out)
        record = find_record(out, record_id, index)
        roots = {Path(r) for r in (image_root, manifest.get("image_root"), Path(str(manifest["input"])).parent) if r}
        image = record.get("image")
        own = [root / str(p) for p in (image if isinstance(image, list) else [image]) if p for root in roots]
        check_not_run_file(dest, manifest, own, image_root or manifest.get("image_root"), SHOW_MARK)
        view = view_record(record, manifest, _decoder(out, manifest, vq, trust_pickle), image_root)
    except CogalignError as e:
        fail(e)
    save_png(compose(view, f"id {view.record_id} - {view.image}"), dest, mark=SHOW_MARK)
    for panel in view.panels:
        if panel.psnr_db is not None:
            say(f"{panel.title}: PSNR {fmt_psnr(panel.psnr_db)} against the region")
    say(f"wrote {dest}")


def gallery(
    out: Path = OutArg,
    dest: Path = typer.Option(..., "--out", "-o", help="Folder for index.html and img/, outside OUT (created; an earlier gallery there is replaced; another index.html, or img/recNNN_K.png files it did not write, are refused)."),
    n: int = typer.Option(24, "--n", min=1, help="Records to show, spread evenly over the output."),
    vq: Optional[str] = VqOpt,
    image_root: Optional[Path] = RootOpt,
    trust_pickle: bool = TrustOpt,
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bar. Default: shown on a terminal."),
) -> None:
    """Write a static HTML gallery of a sample of records.

    DIR/index.html shows each record's panels (as `show`), the prompts they were asked with and the counts from report.json; no server, no external assets (images in DIR/img/)."""
    from cogalign.inspect.gallery import sample_records, write_gallery
    from cogalign.inspect.records import load_manifest
    from cogalign.expand.progress import Progress

    started = time.perf_counter()
    if dest.exists() and not dest.is_dir():
        fail(f"--out {dest}: exists and is not a folder")
    check_out_parent(dest)
    _outside_run(dest, out)
    page = dest / "index.html"
    if page.is_file() and "<title>cogalign gallery:" not in page.read_text(encoding="utf-8", errors="replace")[:2000]:
        fail(f"--out {dest}: holds an index.html that is not a cogalign gallery; choose an empty or new folder")
    try:
        manifest = load_manifest(out)
        decoder = _decoder(out, manifest, vq, trust_pickle)
        records = sample_records(out, n)
        with Progress(len(records), enabled=not no_progress, label="gallery") as bar:
            res = write_gallery(out, dest, n, decoder, image_root, records=records, on_record=lambda: bar.advance(True))
    except CogalignError as e:
        fail(e)
    except OSError as e:
        fail(f"--out {dest}: cannot write ({e.strerror or e}); choose a folder you can write to")
    for _, why in res["skipped_records"][:3]:
        say(f"skipped {why}")
    if len(res["skipped_records"]) > 3:
        say(f"... and {len(res['skipped_records']) - 3} more (listed at the end of the page)")
    say(f"records shown: {res['shown']}  skipped: {res['skipped']}  images: {res['images']}  "
        f"time: {time.perf_counter() - started:.1f} s")
    say(f"open {res['path']}")
