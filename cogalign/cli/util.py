"""What every `cogalign` subcommand prints: one-line errors and status lines, on stderr."""
from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer


def fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def say(line: str) -> None:
    typer.echo(line, err=True)


def check_png_out(dest) -> None:
    """Refuse, before any work, an --out that cannot become a PNG file: another suffix, an existing
    folder, or a parent path that runs through a file."""
    dest = Path(dest)
    if dest.suffix.lower() != ".png":
        fail(f"--out {dest}: must be a .png file")
    if dest.is_dir():
        fail(f"--out {dest}: is a folder; name a .png file, e.g. {dest / 'record.png'}")
    check_out_parent(dest)


def check_out_parent(dest) -> None:
    """Refuse an --out whose parent path runs through an existing file (mkdir would fail there)."""
    for parent in Path(dest).parents:
        if parent.exists():
            if not parent.is_dir():
                fail(f"--out {dest}: {parent} is a file, not a folder; choose another path")
            return


def save_png(image, dest) -> None:
    """Create dest's folder and write the PIL image; an OS error (permissions, full disk) is one line."""
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        image.save(dest, format="PNG")
    except OSError as exc:
        fail(f"--out {dest}: cannot write ({exc.strerror or exc}); choose a folder you can write to")
