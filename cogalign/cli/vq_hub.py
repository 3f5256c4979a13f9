"""`cogalign vq list|push|recon`: known tokenizers, publishing to the Hub, a reconstruction.
Registered on `vq_app` (cli/vq.py) by cli/main.py's _mount_subcommands."""
from __future__ import annotations

import json
from pathlib import Path

import typer

from cogalign.cli.util import check_png_out, fail, save_png, say
from cogalign.cli.vq import vq_app
from cogalign.errors import CogalignError, RecordError


@vq_app.command("list")
def list_(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table. Default: a table.")) -> None:
    """Known tokenizers: name, codebook size, f, embed dim, source, and whether each is here already.

    Here already: shipped, in $COGALIGN_HOME/tokenizers, or in the Hugging Face cache."""
    from cogalign.tokenizers.catalog import KNOWN
    from cogalign.tokenizers.presets import is_local

    try:
        rows = [dict(name=k.name, codes=k.codes, f=k.f, embed_dim=k.embed_dim, kind=k.kind, source=k.source,
                     files=k.files, note=k.note, local=is_local(k)) for k in KNOWN]
    except CogalignError as e:
        fail(e)
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    head = f"{'name':<26} {'codes':>6} {'f':>3} {'dim':>4}  {'local':<5}  source"
    typer.echo(head)
    for r in rows:
        kind = {"hub": "Hub repo", "url": "plain URL (not the Hub)", "shipped": "shipped", "local": "local / Hub"}[r["kind"]]
        typer.echo(f"{r['name']:<26} {r['codes']:>6} {r['f']:>3} {r['embed_dim']:>4}  {'yes' if r['local'] else 'no':<5}  "
                   f"{kind}: {r['source']}")
        typer.echo(f"{'':<26} {'':>6} {'':>3} {'':>4}  {'':<5}  files: {r['files']}" + (f"; {r['note']}" if r["note"] else ""))
    typer.echo("Use one with --vq NAME; hf://OWNER/REPO[@REVISION][/SUBFOLDER] loads any Hub tokenizer.")


@vq_app.command("push")
def push(
    folder: Path = typer.Argument(..., help="Tokenizer folder: one .safetensors, its config.yaml, optionally train_metrics.json."),
    repo: str = typer.Option(..., "--repo", help="Hub model repo to create or update, OWNER/NAME."),
    private: bool = typer.Option(False, "--private", help="Create the repo as private. Default: public."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the folder and print the files and model card; upload nothing. Default: upload."),
) -> None:
    """Upload a tokenizer folder to the Hugging Face Hub with a generated model card.

    The card names the architecture, codebook size, f, training data and PSNR (when known). Pickle checkpoints are refused: `vq convert` first."""
    from cogalign.tokenizers.hub import push as run_push

    try:
        plan = run_push(folder, repo, private=private, dry_run=dry_run)
    except CogalignError as e:
        fail(e)
    say(f"{'would upload' if dry_run else 'uploaded'} to {plan['repo_id']} ({'private' if private else 'public'}): "
        f"{', '.join(plan['files'])} ({plan['bytes']} bytes)")
    if plan["left_out"]:
        say(f"left out: {', '.join(plan['left_out'])} (`vq train`'s resume state, not part of the model)")
    if dry_run:
        typer.echo(plan["card"])
    else:
        say(f"commit: {plan['url']}")
        say(f"use it with: cogalign expand ... --vq hf://{plan['repo_id']}")


@vq_app.command("recon")
def recon(
    image: Path = typer.Argument(..., help="An image file.", exists=True, dir_okay=False),
    vq: str = typer.Option("demo", "--vq", help="Tokenizer: a name (see `vq list`), hf://OWNER/REPO or a checkpoint folder."),
    out: Path = typer.Option(..., "--out", "-o", help="PNG file for the reconstruction. An existing file is replaced only with --overwrite; the input image never."),
    resolution: str = typer.Option("256", "--resolution", help="The image is stretched (bicubic) to N or HxW, multiples of f, before encoding."),
    side_by_side: bool = typer.Option(False, "--side-by-side", help="Write the input and the reconstruction next to each other. Default: the reconstruction only."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow a checkpoint that unpickles Python objects (runs code from the file). Default: off."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file (never the input image). Default: off (refused)."),
) -> None:
    """Encode an image, decode its indices, write the reconstruction and print its PSNR."""
    import numpy as np
    from PIL import Image

    from cogalign.inputs.images import load_image, to_working
    from cogalign.inspect.panels import fmt_psnr, psnr_db
    from cogalign.options import parse_resolution
    from cogalign.tokenizers.decoder import load_decoder
    from cogalign.tokenizers.presets import resolve
    from cogalign.tokenizers.taming import check_fits_memory, load_taming

    if out.exists() and out.resolve() == image.resolve():
        fail(f"--out {out}: is the input image; it is never replaced: choose another path")
    check_png_out(out, overwrite)
    try:
        h, w = parse_resolution(resolution, "resolution")
        path, name = resolve(vq)  # once: a Hub tokenizer is looked up a single time
        tok = load_taming(path, trust_pickle=trust_pickle, name=name)
        if h % tok.downsample or w % tok.downsample:
            fail(f"--resolution {resolution}: each side must be a multiple of f={tok.downsample}")
        check_fits_memory(tok.params, h, w, "--resolution")
        dec = load_decoder(path, trust_pickle=trust_pickle, name=name)
        try:
            x = to_working(load_image(image), (h, w))
        except RecordError as e:
            fail(f"{e}; pass an image file PIL can read (PNG, JPEG, WebP, ...)")
        rec = dec.decode(tok.encode(x[None])[0])
    except CogalignError as e:
        fail(e)
    save_png(Image.fromarray(np.concatenate([x, rec], axis=1) if side_by_side else rec), out)
    typer.echo(f"PSNR: {fmt_psnr(psnr_db(rec, x))} ({tok.name}, {h}x{w} (HxW), {(h // tok.downsample) * (w // tok.downsample)} indices)")
    say(f"wrote {out}")
