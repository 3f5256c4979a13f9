"""What every `cogalign` subcommand prints: one-line errors and status lines, on stderr."""
from __future__ import annotations

from typing import NoReturn

import typer


def fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def say(line: str) -> None:
    typer.echo(line, err=True)
