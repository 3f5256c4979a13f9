"""`--help` of every command renders (rich markup in a help text must not break it), and the
options of every command each say their default."""
from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from cogalign.cli import app

ROOT = typer.main.get_command(app)


def _commands(cmd=ROOT, path=()):
    if hasattr(cmd, "commands"):
        for name, sub in cmd.commands.items():
            yield from _commands(sub, path + (name,))
    else:
        yield path, cmd


COMMANDS = dict(_commands())


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_every_command_help_renders(path):
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0 and result.exception is None, result.output[-2000:]
    assert "Options" in result.output or "Arguments" in result.output


def test_hub_spec_syntax_is_printed_not_eaten_as_markup():
    result = CliRunner().invoke(app, ["expand", "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output[-2000:]
    assert "hf://OWNER/REPO[@REVISION][/SUBFOLDER]" in result.output


CHECKED = sorted(COMMANDS)


@pytest.mark.parametrize("path", CHECKED, ids=" ".join)
def test_options_say_their_default(path):
    for p in COMMANDS[path].params:
        if p.name == "help" or p.param_type_name != "option" or p.required:
            continue
        shown = p.show_default and p.default is not None and not p.is_flag
        said = "default" in (p.help or "").lower() or "give --id or --index" in (p.help or "").lower()
        assert p.help and (shown or said), f"{' '.join(path)} {p.opts[0]}: {p.help!r} does not say its default"
