"""`cogalign publish | export | stats`: thin typer commands over cogalign.hub."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import orjson
import typer

from cogalign.cli.util import fail, say
from cogalign.errors import CogalignError

Out = typer.Argument(..., help="Output folder of a finished `cogalign expand` run (merged: report.json present).")
NoProgress = typer.Option(False, "--no-progress", help="Hide the progress bar. Default: shown on a terminal.")


def publish(
    out: Path = Out,
    repo: str = typer.Option(..., "--repo", help="Dataset repository on the Hub, OWNER/NAME (created if missing)."),
    private: bool = typer.Option(False, "--private", help="Create the repository private. Default: public (an existing repository keeps its visibility)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to commit to (created if missing). Default: main."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the files, their sizes and the target, then stop; no network call. Default: off."),
    include_all: bool = typer.Option(False, "--include-all", help="Upload every file of the folder (stats/, manifest, rejects.jsonl, ...), not only data/, README.md and report.json. Default: off."),
    card: Optional[str] = typer.Option(None, "--card", help="ours: upload cogalign's dataset card as README.md; yours: upload the README.md of yours that expand kept, as it is. Default: cogalign's card; refused when README.md is yours (choose)."),
    license: Optional[str] = typer.Option(None, "--license", help="The data's license id for the card (the source dataset's, e.g. cc-by-4.0, apache-2.0). Default: none (the card names no license)."),
) -> None:
    """Upload a finished output folder to a Hugging Face dataset repository (resumable: rerun to continue).

    Token: HF_TOKEN or `hf auth login`. Endpoint: HF_ENDPOINT (default https://huggingface.co)."""
    from cogalign.hub.publish import plan_publish, publish as run_publish, resumable

    try:
        plan = plan_publish(out, repo, revision, private, include_all, card, license)
        for line in plan.lines():
            typer.echo(line)
        if dry_run:
            for note in plan.notes:
                say(note)
            say("dry run: nothing uploaded")
            return
        if not resumable():
            say("note: hf_xet is not installed, so this upload is one commit and not resumable (pip install hf_xet)")
        started = time.perf_counter()
        url = run_publish(plan)
    except CogalignError as e:
        fail(e)
    for note in plan.notes:
        say(note)
    say(f"uploaded {len(plan.files)} files ({plan.total_bytes:,} B) in {time.perf_counter() - started:.1f} s: {url}")


def export(
    out: Path = Out,
    to: str = typer.Option(..., "--to", help="llava-json (one JSON array, LLaVA), llava-jsonl (LLaVA-NeXT), sharegpt (LLaMA-Factory, + dataset_info.json), messages (TRL / HF chat)."),
    dest: Path = typer.Option(..., "--out", "-o", help="File to write: .json (a JSON array) or .jsonl (JSON lines); llava-json needs .json, llava-jsonl .jsonl. An existing file is replaced only with --overwrite; the run's input and dataset_info.json never."),
    image_folder: Optional[Path] = typer.Option(None, "--image-folder", help="Folder the trainer joins image paths to (LLaVA --image_folder, LLaMA-Factory media_dir); paths are written relative to it, and images the output holds only as bytes (--embed-images) are written into <folder>/<--out name>-images/. Default: paths unchanged (relative to --image-root)."),
    image_root: Optional[Path] = typer.Option(None, "--image-root", help="Folder the output's image paths are relative to. Default: the folder of the input `expand` read."),
    rejects: Optional[Path] = typer.Option(None, "--rejects", help="Where records that break a rule are listed with their reasons. Default: <--out>.rejects.jsonl."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out / --rejects file and the images an earlier export wrote into <--image-folder>/<name>-images/ (never the run's input, a binary file such as an image, nor a folder export did not make). Default: off (refused)."),
    drop_keys: bool = typer.Option(False, "--drop-keys", help="Write only the format's own keys. Default: off (other keys, e.g. data_source and the `cogalign` provenance, are kept; LLaVA, LLaMA-Factory and TRL ignore them)."),
    no_progress: bool = NoProgress,
) -> None:
    """Write the records in a trainer's format; records that would break that trainer are listed, not written."""
    from cogalign.hub.export import export as run_export
    from cogalign.expand.report import top_reasons

    started = time.perf_counter()
    try:
        result = run_export(out, to, dest, image_root, image_folder, rejects, progress=not no_progress,
                            overwrite=overwrite, keep_keys=not drop_keys)
    except CogalignError as e:
        fail(e)
    seconds = time.perf_counter() - started
    say(f"records: {result.written + result.rejected}  written: {result.written}  rejected: {result.rejected}")
    say(f"reject reasons: {top_reasons(dict(result.reasons), n=10)}")
    say(f"time: {seconds:.1f} s  throughput: {(result.written + result.rejected) / max(seconds, 1e-9):.1f} records/s")
    say(f"output: {result.path}  rejects: {result.rejects_path}")
    if result.images_written:
        say(f"images written from the output's bytes: {result.images_written} (under {image_folder})")
    if result.dataset_info:
        say(f"registered as {result.path.stem!r} in {result.dataset_info} (set media_dir to the image folder)")


def stats(
    out: Path = Out,
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="A Hugging Face tokenizer.json, its folder, or a Hub id (from the cache, or HF_ENDPOINT). Default: none (characters only)."),
    max_length: int = typer.Option(4096, "--max-length", min=1, help="The trainer's model_max_length: count the records whose conversation is longer (needs --tokenizer)."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON instead of a table. Default: off."),
    no_progress: bool = NoProgress,
) -> None:
    """Characters and tokens per turn kind (original, VQ, RGB): median, p95, max; records over --max-length."""
    from cogalign.hub.stats import load_tokenizer, measure, report, table

    try:
        tok = load_tokenizer(tokenizer) if tokenizer else None
        rep = report(measure(out, tok, progress=not no_progress), max_length, tok is not None)
    except CogalignError as e:
        fail(e)
    if as_json:
        typer.echo(orjson.dumps(rep, option=orjson.OPT_INDENT_2).decode())
    else:
        for line in table(rep):
            typer.echo(line)


def mount(app: typer.Typer) -> None:
    app.command("publish")(publish)
    app.command("export")(export)
    app.command("stats")(stats)
