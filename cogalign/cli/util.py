"""What every `cogalign` subcommand prints: one-line errors and status lines, on stderr."""
from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer


def error_text(error: BaseException | str) -> str:
    """What the CLI prints for an error: an `OptionError` with the command-line flags
    (`--px-resolution 1x1`) where `str()` names the Python parameters (`px_resolution=1x1`)."""
    return getattr(error, "cli_message", None) or str(error)


def fail(message: BaseException | str, code: int = 2) -> NoReturn:
    """Print `error: MESSAGE` (an exception: in the CLI's wording) on stderr and exit with `code`."""
    typer.echo(f"error: {error_text(message)}", err=True)
    raise typer.Exit(code)


def say(line: str) -> None:
    """A status line on stderr (stdout stays for the command's data)."""
    typer.echo(line, err=True)


def check_png_out(dest, overwrite: bool | None = None) -> None:
    """Refuse, before any work, an --out that cannot become a PNG file: another suffix, an existing
    folder, or a parent path that runs through a file; with `overwrite` given (a command that has
    --overwrite), an existing file unless it is True."""
    dest = Path(dest)
    if dest.suffix.lower() != ".png":
        fail(f"--out {dest}: must be a .png file")
    if dest.is_dir():
        fail(f"--out {dest}: is a folder; name a .png file, e.g. {dest / 'record.png'}")
    if overwrite is False and dest.exists():
        fail(f"--out {dest}: exists; pass --overwrite to replace it, or choose another name")
    check_out_parent(dest)


def check_not_run_file(dest, manifest: dict, images=(), image_root=None, mark: str | None = None) -> None:
    """Refuse an existing --out that the run read: its input, one of `images` (the record's own image
    files), or a file under `image_root` that is not a PNG this command wrote (its `mark`): no command
    replaces those, --overwrite or not."""
    from cogalign.hub.export import is_run_input

    dest = Path(dest)
    if not dest.exists():
        return
    if any(dest.resolve() == Path(p).resolve() for p in images):
        fail(f"--out {dest}: is the record's own image; it is never replaced: choose another path")
    if image_root is not None and dest.resolve().is_relative_to(Path(image_root).resolve()) \
            and not png_marked(dest, mark):
        fail(f"--out {dest}: is a file under the run's image root {image_root} that cogalign did not write; "
             "it is never replaced: choose another path")
    if is_run_input(dest, manifest):
        fail(f"--out {dest}: is the input the run read; it is never replaced: choose another path")


def png_marked(path, mark: str | None) -> bool:
    """Is `path` a PNG whose Software text is `mark` (written by `save_png(..., mark=mark)`)?"""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return mark is not None and getattr(im, "text", {}).get("Software") == mark
    except Exception:
        return False


def check_out_parent(dest) -> None:
    """Refuse an --out whose parent path runs through an existing file (mkdir would fail there)."""
    for parent in Path(dest).parents:
        if parent.exists():
            if not parent.is_dir():
                fail(f"--out {dest}: {parent} is a file, not a folder; choose another path")
            return


def save_png(image, dest, mark: str | None = None) -> None:
    """Create dest's folder and write the PIL image (with `mark` as its Software text, which tells
    the PNG as this command's later); an OS error (permissions, full disk) is one line."""
    from PIL.PngImagePlugin import PngInfo

    dest = Path(dest)
    info = PngInfo()
    if mark:
        info.add_text("Software", mark)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        image.save(dest, format="PNG", pnginfo=info)
    except OSError as exc:
        fail(f"--out {dest}: cannot write ({exc.strerror or exc}); choose a folder you can write to")
