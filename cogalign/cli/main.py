"""The `cogalign` command line: a thin typer layer over the library."""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer

from cogalign.cli.util import error_text, fail, say
from cogalign.errors import CogalignError
from cogalign.options import DEFAULT_MAX_IMAGE_PIXELS, MAX_SEED, ExpandOptions

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Add cognition-alignment turns (VQ indices and RGB values of image regions) to LLaVA data.")


def _print_version(value: bool) -> None:
    if value:
        from cogalign import __version__

        typer.echo(f"cogalign {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print cogalign's version and exit. Default: off.")) -> None:
    """Add cognition-alignment turns (VQ indices and RGB values of image regions) to LLaVA data."""


def _default_workers() -> int:
    return max(1, min(16, (os.cpu_count() or 2) - 1))


def _human_bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000


def _options(targets, regions, vq, vq_resolution, px_resolution, vq_scope, resize, resample, seed, templates,
             max_image_pixels, allow_absolute_paths, fmt, embed_images: bool = False, precision="fp32",
             channels_last=False, compile_=False) -> ExpandOptions:
    """The CLI's strings as they are: `ExpandOptions` parses and checks them."""
    return ExpandOptions(
        targets=targets, regions=regions, vq=vq, vq_resolution=vq_resolution,
        px_resolution=px_resolution, vq_scope=vq_scope, resize=resize,
        resample=resample, seed=seed, templates=templates, max_image_pixels=max_image_pixels,
        allow_absolute_paths=allow_absolute_paths, format=fmt, embed_images=embed_images,
        vq_precision=precision, vq_channels_last=channels_last, vq_compile=compile_)


def _check_out_dir(out: Path) -> None:
    """`--out` must be a folder, or a path whose first existing parent is a folder we can write in."""
    first = out
    while not first.exists() and first != first.parent:
        first = first.parent
    if not first.is_dir():
        fail(f"--out {out}: {first} is a file, not a folder; choose another --out")
    if not os.access(first, os.W_OK | os.X_OK):
        fail(f"--out {out}: cannot write in {first} (permission denied); choose another --out")


# Options shared by expand and validate, declared once.
ImageRoot = typer.Option(None, "--image-root", help="Folder that `image` paths are relative to. Default: the input file's folder (the input folder for a folder input).")
MaxPixels = typer.Option(DEFAULT_MAX_IMAGE_PIXELS, "--max-image-pixels", min=1, help="Reject images with more pixels than this (decompression-bomb guard).")
AllowAbs = typer.Option(False, "--allow-absolute-paths", help="Accept absolute `image` paths and symlinks out of the root. Default: off (only paths under --image-root are opened).")
Workers = typer.Option(None, "--workers", min=0, max=1024, help="Worker processes (0 to 1024): expand's each own whole shards (decode, RGB text, splice, write), validate's decode; 0 does it all in the main process. Default: CPU cores - 1 (max 16).")
NoProgress = typer.Option(False, "--no-progress", help="Hide the progress bar. Default: shown on a terminal.")


@app.command()
def expand(
    input: str = typer.Argument(..., help="LLaVA JSON array or JSONL file; parquet file or folder (Hub layout, embedded images); datasets save_to_disk folder; LLaVA-NeXT YAML mixture; a Hub dataset hf://datasets/OWNER/NAME\\[@REVISION]\\[/PATH] (docs/hub-input.md)."),
    out: Path = typer.Option(Path("out"), "--out", "-o", help="Output folder (shards, report.json, rejects.jsonl, card)."),
    # issue 14: which config and split of a parquet folder or Hub dataset (datasets' rules)
    config: Optional[str] = typer.Option(None, "--config", help="Parquet folder or hf://datasets input: the config (the card's `configs`). Default: the card's default config, else the only one."),
    split: Optional[str] = typer.Option(None, "--split", help="Parquet folder, save_to_disk DatasetDict or hf://datasets input: the split, by the Hub's file-name rules (data/train-*, *test*...). Default: train, else the only split."),
    vq: str = typer.Option("demo", "--vq", help="VQ tokenizer: a name (demo, vqgan-4096, ...: see `cogalign vq list`), hf://OWNER/REPO\\[@REVISION]\\[/SUBFOLDER] from the Hugging Face Hub, or a taming checkpoint folder/file with its yaml."),
    targets: str = typer.Option("vq,px", "--targets", help="Which pairs to add, comma-separated: vq, px."),
    regions: str = typer.Option("quarters", "--regions", help="Regions to draw from: names (full, upper-left, ..., left, ..., center, box) or groups (quarters, halves, all), comma-separated."),
    vq_resolution: str = typer.Option("672", "--vq-resolution", help="Working resolution of the VQ target: N or HxW (a multiple of the tokenizer's factor)."),
    px_resolution: str = typer.Option("672", "--px-resolution", help="Working resolution of the RGB target: N or HxW. 672 reproduces the paper (1.8 MB of text per quarter); 32 is trainable."),
    vq_scope: str = typer.Option("region", "--vq-scope", help="region: encode each region on its own; image: encode the whole image once and slice the index grid."),
    resize: str = typer.Option("stretch", "--resize", help="How images reach the working resolution: stretch, pad (LLaVA pad-to-square), crop (centre square)."),
    resample: str = typer.Option("bicubic", "--resample", help="Resize filter: bicubic, bilinear, lanczos, nearest, box, hamming."),
    seed: int = typer.Option(0, "--seed", min=0, max=MAX_SEED, help="Run seed, 0 or more; each record's choices come from (seed, record position), as do the random:N picks of a YAML mixture."),
    templates: Optional[Path] = typer.Option(None, "--templates", help="Your own templates: a folder with vq.txt/px.txt, or a .json/.yaml with vq and px lists. Default: the paper's Tables 4 and 5."),
    fmt: str = typer.Option("parquet", "--format", help="parquet (Hub layout data/train-*.parquet), jsonl, or json (one LLaVA file is also assembled at the end)."),
    embed_images: bool = typer.Option(False, "--embed-images", help="parquet only: store each image file's bytes in the `image` column (a datasets Image), so the output loads anywhere without the image folder. Default: off (paths)."),
    image_root: Optional[Path] = ImageRoot,
    batch_size: int = typer.Option(32, "--batch-size", min=1, max=4096, help="Regions per tokenizer batch (1 to 4096; the decoder keeps about as many records in flight)."),
    workers: Optional[int] = Workers,
    device: str = typer.Option("auto", "--device", help="Tokenizer device: auto (this rank's GPU if any, else cpu), cpu, cuda, cuda:N."),
    precision: str = typer.Option("fp32", "--precision", help="VQ encoder precision: fp32, bf16 or fp16 (autocast; the codebook distance is always float32). bf16/fp16 are faster on GPUs but move some near-tie indices, so the precision is recorded in each record and the run manifest. fp16 is refused on the CPU (no fast kernels)."),
    channels_last: bool = typer.Option(False, "--channels-last", help="Run the VQ encoder in channels_last memory layout (faster on some GPUs; other kernels, so some indices differ from taming's contiguous layout; recorded like --precision). Default: off (contiguous NCHW, as taming)."),
    compile_: bool = typer.Option(False, "--compile", help="Run the VQ encoder through torch.compile (compiled once per crop shape; on the CPU it then runs on one thread; recorded like --precision). Default: off (eager)."),
    shard_size: Optional[int] = typer.Option(None, "--shard-size", min=1, max=MAX_SEED, help="Input records per output shard. Default: sized so a shard holds about 256 MB."),
    num_shards: int = typer.Option(1, "--num-shards", min=1, help="Split the job into this many slices (Slurm arrays, several machines); each run does one."),
    shard_index: int = typer.Option(0, "--shard-index", min=0, help="Which slice this run does, 0..num-shards-1."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over: delete what an earlier run of these settings wrote in --out (a slice: only its own shards) and redo it; with other settings, reset the folder (a slice is refused: run `cogalign reset OUT`). Your own files are never deleted. Default: off (resume)."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow checkpoints that unpickle Python objects (runs code from the file; only for sources you trust). Default: off."),
    max_image_pixels: int = MaxPixels,
    allow_absolute_paths: bool = AllowAbs,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print how many records would be expanded and the estimated output size, then stop. Default: off."),
    llm_tokenizer: Optional[Path] = typer.Option(None, "--llm-tokenizer", help="With --dry-run: a Hugging Face tokenizer.json (or its folder); the new turns of a few real records are built and their token counts printed. Needs `pip install tokenizers`. Default: none."),
    memory_budget: str = typer.Option("512MB", "--memory-budget", help="Bytes for the queues and buffers between the stages (records kept for redo, records awaiting VQ indices, shared-memory crops), e.g. 512MB, 2GB; never changes the output."),
    ignore_disk_space: bool = typer.Option(False, "--ignore-disk-space", help="Start even when the estimated output is larger than the free space at --out. Default: off (refused before any work)."),
    no_progress: bool = NoProgress,
) -> None:
    """Expand every image record with one VQ pair and one RGB pair (Tables 4-6 of the paper)."""
    from cogalign.expand import report
    from cogalign.expand.executor import Runtime, expand as run_expand, resolve_options

    if llm_tokenizer and not dry_run:
        fail(f"--llm-tokenizer {llm_tokenizer} counts tokens only with --dry-run; add --dry-run, or use "
             f"`cogalign stats OUT --tokenizer {llm_tokenizer}` after the run")
    _check_out_dir(out)
    try:
        from cogalign.inputs import resolve_input

        input = resolve_input(input, config, split)  # a parquet folder or Hub dataset: one config and split
        options = _options(targets, regions, vq, vq_resolution, px_resolution, vq_scope, resize, resample, seed,
                           str(templates) if templates else None, max_image_pixels, allow_absolute_paths, fmt,
                           embed_images, precision, channels_last, compile_)
        runtime = Runtime(batch_size=batch_size, workers=_default_workers() if workers is None else workers,
                          device=device, shard_size=shard_size, overwrite=overwrite, num_slices=num_shards,
                          slice_index=shard_index, progress=not no_progress, trust_pickle=trust_pickle,
                          memory_budget=_memory_budget(memory_budget), ignore_disk_space=ignore_disk_space)
        if dry_run:
            from cogalign.expand.validate import dry_run as run_dry, load_llm_tokenizer

            llm = load_llm_tokenizer(llm_tokenizer) if llm_tokenizer else None
            # sizes do not depend on the encoder mode: estimate with the default one on the CPU
            plain = options.replace(vq_precision="fp32", vq_channels_last=False, vq_compile=False)
            options, sampler, tokenizer = resolve_options(plain, replace(runtime, device="cpu"))
            facts = run_dry(input, options, tokenizer, sampler, image_root, llm)
            for key, value in facts.items():
                typer.echo(f"{key}: {_human_bytes(value) if key.endswith('bytes') else value}")
            return
        result = run_expand(input, out, options, runtime, image_root)
    except CogalignError as e:
        fail(e)
    except OSError as e:  # --out cannot be made or written (a read-only or special file system, a full disk)
        if not e.filename or not Path(os.path.abspath(e.filename)).is_relative_to(Path(os.path.abspath(out))):
            raise
        fail(f"--out {out}: cannot write {e.filename} ({e.strerror or e}); choose another --out")
    except KeyboardInterrupt:
        fail(f"interrupted; completed shards in {out} are kept: rerun the same command to resume", 130)
    if not result.is_main:
        return  # torchrun: the first rank prints the summary for the whole launch
    note = f"skipped {result.shards_skipped} shards already complete (resume)" if result.shards_skipped else ""
    if result.finalized:  # the totals of the whole output, from report.json
        rep = result.report
        converted = f"converted from chat format: {report.top_reasons(rep['converted'])}" if rep.get("converted") else ""
        lines = report.summary_lines(report.report_counts(rep), rep["reject_reasons"], result.seconds,
                                     str(out), "\n".join(filter(None, [note, converted, report.card_note(out)])),
                                     warnings=rep["warnings"], processed=result.counts)
    else:
        where = f"{out}  (this slice is done; once all slices are, the last one writes the report, or run " \
                f"`cogalign merge-report {out}`)"
        lines = report.summary_lines(result.counts, result.reasons, result.seconds, where, note,
                                     warnings=result.warnings)
    for line in lines:
        say(line)


def _memory_budget(text: str) -> int:
    from cogalign.expand.estimate import parse_size

    try:
        budget = parse_size(text)
    except ValueError as e:
        fail(f"--memory-budget {text}: {e}", 2)
    if budget < 16 * 1000 ** 2:
        fail(f"--memory-budget {text}: at least 16MB, e.g. 512MB", 2)
    return budget


@app.command()
def validate(
    input: str = typer.Argument(..., help="LLaVA JSON array or JSONL file; parquet file or folder (Hub layout, embedded images); datasets save_to_disk folder; LLaVA-NeXT YAML mixture; a Hub dataset hf://datasets/OWNER/NAME\\[@REVISION]\\[/PATH] (docs/hub-input.md)."),
    config: Optional[str] = typer.Option(None, "--config", help="Parquet folder or hf://datasets input: the config (the card's `configs`). Default: the card's default config, else the only one."),
    split: Optional[str] = typer.Option(None, "--split", help="Parquet folder, save_to_disk DatasetDict or hf://datasets input: the split, by the Hub's file-name rules (data/train-*, *test*...). Default: train, else the only split."),
    image_root: Optional[Path] = ImageRoot,
    rejects: Optional[Path] = typer.Option(None, "--rejects", help="Write one JSON line per rejected record here (its folder is made if missing; an existing file only if it is an earlier rejects list). Default: not written (the summary still counts them)."),
    workers: Optional[int] = Workers,
    max_image_pixels: int = MaxPixels,
    allow_absolute_paths: bool = AllowAbs,
    seed: int = typer.Option(0, "--seed", help="For a YAML mixture: the seed of its random:N picks (use expand's)."),
    no_progress: bool = NoProgress,
) -> None:
    """Check every record and decode every image without computing targets; exit 1 if anything is rejected."""
    from cogalign.expand import report
    from cogalign.expand.validate import validate as run_validate

    try:
        from cogalign.inputs import resolve_input

        input = resolve_input(input, config, split)  # as expand reads it: one config and split, or the path
        options = ExpandOptions(max_image_pixels=max_image_pixels, allow_absolute_paths=allow_absolute_paths, seed=seed)
        result = run_validate(input, options, image_root, _default_workers() if workers is None else workers,
                              rejects, progress=not no_progress)
    except CogalignError as e:
        fail(e)
    for line in report.summary_lines(result.counts, result.reasons, result.seconds, str(rejects or "-"),
                                     expanded_label="would expand", warnings=result.warnings):
        say(line)
    if not result.ok:
        raise typer.Exit(1)


@app.command("merge-report")
def merge_report(out: Path = typer.Argument(..., help="Output folder of a sliced run (--num-shards).")) -> None:
    """Write report.json, rejects.jsonl and the dataset card once every slice has finished."""
    from cogalign.expand import report

    try:
        rep = report.finalize(out)
    except (CogalignError, FileNotFoundError) as e:
        fail(e)
    say(f"records: {rep['input']}  expanded: {rep['expanded']}  passed: {rep['passed']}  rejected: {rep['rejected']}")
    say(f"top reject reasons: {report.top_reasons(rep['reject_reasons'])}")
    if rep["warnings"]:
        say(f"warnings (kept): {report.top_reasons(rep['warnings'])}")
    say(f"output: {out}")
    if note := report.card_note(out):
        say(note)


@app.command()
def reset(out: Path = typer.Argument(..., help="A cogalign output folder.")) -> None:
    """Delete what cogalign wrote in OUT (per its cogalign.json); your own files there stay.

    Use it to start over with other settings or another input, while no slice is writing to OUT."""
    from cogalign.expand.layout import reset as run_reset

    try:
        n = run_reset(out)
    except CogalignError as e:
        fail(e)
    left = sorted(p.name for p in out.iterdir() if p.name != "cogalign.json") if out.is_dir() else []
    say(f"deleted {n} files cogalign wrote in {out}" + (f"; kept: {', '.join(left[:5])}" if left else ""))


def _mount_subcommands() -> None:
    from cogalign.cli.templates import templates_app
    from cogalign.cli.vq import vq_app
    import cogalign.cli.vq_hub  # noqa: F401  (vq list, push, recon on vq_app)
    from cogalign.cli.hub import mount as mount_hub
    from cogalign.cli.inspect import gallery, show
    from cogalign.cli.train import register as register_train

    app.add_typer(templates_app, name="templates", help="List, show and sample the prompt templates.")
    app.add_typer(vq_app, name="vq", help="Train, inspect, evaluate and convert VQ tokenizers.")
    mount_hub(app)  # publish, export, stats
    app.command("show")(show)
    app.command("gallery")(gallery)
    register_train(app)  # train, generate, eval


_mount_subcommands()


def _full_option_names() -> None:
    """Rich help tables never cut an option name (`--dead-code-thresho…` at 80 columns): every
    column but the help text keeps its width, and a long word in the help text folds."""
    from rich.columns import Columns
    from rich.table import Table
    from rich.text import Text
    from typer import rich_utils

    class FullNameTable(Table):
        def add_row(self, *renderables, **kwargs):
            help_ = renderables[-1] if renderables else None
            for part in getattr(help_, "renderables", [help_]):
                if isinstance(part, Text):
                    part.overflow = "fold"
            if isinstance(help_, Columns) and len(renderables) >= 6:
                # an options table: every name of the option (aliases, `--no-…`) on its own line of
                # one cell, so that the help text keeps the width (`--save-steps,--save-every`)
                head, names, tail = renderables[:-6], renderables[-6:-2], renderables[-2:]
                lines = [part for r in names if isinstance(r, Text) for part in r.split(",") if part.plain]
                names = [Text("\n").join(lines)] + [Text("")] * (len(names) - 1)
                renderables = [*head, *names, *tail]
            super().add_row(*renderables, **kwargs)
            if not isinstance(help_, Columns):
                return  # not an options table
            for col in self.columns[:-2]:  # the names; the type column and the help wrap
                col.no_wrap = True

    rich_utils.Table = FullNameTable

    def reflow(paragraphs: list[str], markup_mode) -> str:
        """A docstring's paragraphs reflowed to the terminal (this typer keeps the source's line
        breaks, so an 80-column help showed `or `tiny` /` alone on a line); `\b` keeps a paragraph."""
        return "\n\n".join(p if p.startswith("\b") else " ".join(p.split("\n")) for p in paragraphs)

    rich_utils._fix_linebreaks = reflow


_full_option_names()


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


@contextlib.contextmanager
def one_line_warnings():
    """Library warnings (torch's pickle and DDP notices, ...) as one `warning:` line each, once
    per message, instead of a file path, a source line and a multi-line text."""
    import warnings

    seen: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None):
        text = _one_line(message)
        if text not in seen:
            seen.add(text)
            typer.echo(f"warning: {text[:300]}", err=True)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def main(argv: list[str] | None = None) -> None:
    """Run the app; usage errors (a missing argument, `--steps abc`) and library warnings come out
    as one line each instead of typer's boxes and tracebacks."""
    try:
        from typer._click import exceptions as click  # typer >= 0.26 carries its own copy of click
    except ImportError:
        from click import exceptions as click

    with one_line_warnings():
        try:
            rc = app(args=argv, prog_name="cogalign", standalone_mode=False)
        except click.NoArgsIsHelpError as e:
            e.show()
            sys.exit(e.exit_code)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else "cogalign"
            typer.echo(f"error: {where}: {_one_line(e.format_message())} (see `{where} --help`)", err=True)
            sys.exit(2)
        except click.ClickException as e:
            typer.echo(f"error: {_one_line(e.format_message())}", err=True)
            sys.exit(e.exit_code)
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            sys.exit(1)
        except CogalignError as e:
            typer.echo(f"error: {_one_line(error_text(e))}", err=True)
            sys.exit(2)
    sys.exit(rc if isinstance(rc, int) else 0)
