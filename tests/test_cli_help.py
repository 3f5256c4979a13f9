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
        shown = p.show_default and p.default is not None and (not p.is_flag or bool(p.secondary_opts))  # typer shows it
        said = "default" in (p.help or "").lower() or "give --id or --index" in (p.help or "").lower()
        assert p.help and (shown or said), f"{' '.join(path)} {p.opts[0]}: {p.help!r} does not say its default"


@pytest.mark.parametrize("path", CHECKED, ids=" ".join)
def test_every_option_name_is_readable_in_full_at_80_columns(path):
    """issue 15 #18: `--dead-code-thresho…`, `--allow-absolute-pa…` were cut at 80 columns."""
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output[-2000:]
    assert "…" not in result.output
    for p in COMMANDS[path].params:
        for name in [*p.opts, *p.secondary_opts]:
            if name.startswith("--"):
                assert name in result.output, f"{' '.join(path)}: {name} is not shown in full"


@pytest.mark.parametrize("argv, words", [
    (["vq", "convert", "."], ["'ckpt'", "directory", "cogalign vq convert --help"]),
    (["vq", "recon", "."], ["'image'", "directory"]),
    (["show", "no-such-dir-here"], ["does not exist"]),
    (["vq", "train", "x", "--out", "y", "--steps", "abc"], ["--steps", "integer"]),
    (["vq", "train", "x"], ["Missing option '--out'"]),
    (["vq", "no-such-command"], ["No such command"]),
])
def test_usage_errors_are_one_line(argv, words, capsys):
    """issue 15 #17: typer's boxed usage errors become one `error:` line, exit status 2."""
    from cogalign.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for w in words:
        assert w in err


def test_library_warnings_are_one_line_each(capsys):
    """issue 15 #17: torch's multi-line UserWarning/FutureWarning text becomes one line, once."""
    import warnings

    from cogalign.cli.main import one_line_warnings

    with one_line_warnings():
        for _ in range(2):
            warnings.warn("The `broadcast_buffers` argument\nis deprecated.\n  more", FutureWarning)
    err = capsys.readouterr().err
    assert err == "warning: The `broadcast_buffers` argument is deprecated. more\n"


def _description(path) -> list[list[str]]:
    """The paragraphs of a command's 80-column help above its first panel."""
    out = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "80"}).output
    lines = out.split("╭")[0].splitlines()
    lines = lines[next(i for i, l in enumerate(lines) if "Usage:" in l) + 1:]
    paras, cur = [], []
    for line in lines + [""]:
        if line.strip():
            cur.append(line.rstrip())
        elif cur:
            paras, cur = paras + [cur], []
    return paras


@pytest.mark.parametrize("path", CHECKED, ids=" ".join)
def test_descriptions_reflow_to_the_terminal(path):
    """A docstring's source line breaks showed at 80 columns (`folder), or `tiny` /` alone on a line)."""
    for para in _description(path):
        assert all(len(line) >= 55 for line in para[:-1]), para


def test_train_help_keeps_its_help_column_wide_at_80_columns():
    """`--dataloader-num-workers,--workers` and `--tf32`'s `--no-tf32` column left 11 columns for the
    help texts of `cogalign train` (`vision_towe r`, `safetensor s`): 502 lines of help."""
    out = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "80"}).output
    row = next(l for l in out.splitlines() if "--model" in l and "│" in l)
    help_width = len(row.rstrip(" │")) - row.index("LLaVA") + (len(row) - len(row.rstrip(" │")) - 1)
    assert help_width >= 24, row
    assert "--dataloader-num-workers" in out and "--workers" in out and "--no-tf32" in out
    assert len(out.splitlines()) < 300


def test_version_flag_prints_the_package_version():
    import cogalign

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"cogalign {cogalign.__version__}"


def test_expand_options_say_their_default_once():
    """`Default: 512MB. [default: 512MB]`: a help text that names its default, beside the one typer shows."""
    for p in COMMANDS[("expand",)].params:
        if p.param_type_name == "option" and p.show_default and p.default is not None and not p.is_flag:
            assert "default:" not in (p.help or "").lower(), f"expand {p.opts[0]}: {p.help!r} says its default twice"


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_options_say_their_default_once(path):
    """Typer prints `[default: X]` itself: a help text that also says `Default: X.` said it twice."""
    out = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "400"}).output
    twice = [" ".join(line.split())[:120] for line in out.splitlines() if "Default:" in line and "[default:" in line]
    assert not twice, twice
