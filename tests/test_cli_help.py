"""Every command's --help renders (typer's rich markup must not choke on a help text)."""
import typer
from typer.testing import CliRunner

from cogalign.cli import app


def _commands(command, path):
    yield path
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, path + [name])


def test_every_help_renders():
    runner = CliRunner()
    failures = []
    for path in _commands(typer.main.get_command(app), []):
        result = runner.invoke(app, path + ["--help"])
        if result.exit_code != 0:
            failures.append((path, repr(result.exception)))
    assert not failures
    out = runner.invoke(app, ["expand", "--help"], env={"COLUMNS": "300"}).output
    assert "hf://OWNER/REPO[@REVISION][/SUBFOLDER]" in out
