"""Error types shared by the stages. Each carries a short reason code and a one-line detail."""
from __future__ import annotations

import re

__all__ = ["CogalignError", "RecordError", "InputError", "OptionError", "python_wording", "cli_flag"]


class CogalignError(Exception):
    """Base class: the message is one line that names the file or record and the fix."""


class RecordError(CogalignError):
    """One input record cannot be used. `reason` is a stable code counted in report.json;
    `detail` is the human-readable cause (the decoder's message, the path tried, ...)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class InputError(CogalignError):
    """The input file as a whole cannot be read (not found, not JSON, truncated array...)."""


# Flags whose Python parameter (of `ExpandOptions`, `Runtime` or `expand()`) is not the flag's own name.
_PARAMETERS = {"precision": "vq_precision", "channels-last": "vq_channels_last", "compile": "vq_compile",
               "num-shards": "num_slices", "shard-index": "slice_index", "out": "out_dir"}
_FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9-]*)( (?=['\"(\[\d]|-\d))?")


_FLAGS = {parameter: flag for flag, parameter in _PARAMETERS.items()}


def cli_flag(parameter: str) -> str:
    """The `--flag` for Python parameter `parameter` (`vq_compile` -> `--compile`), the inverse of `python_wording`."""
    return "--" + _FLAGS.get(parameter, parameter.replace("_", "-"))


def python_wording(message: str) -> str:
    """`message` with each `--flag` named as the Python parameter a caller passes (`--px-resolution
    1x1` -> `px_resolution=1x1`, `--precision` -> `vq_precision`)."""
    def name(m: re.Match) -> str:
        flag = m.group(1)
        return _PARAMETERS.get(flag, flag.replace("-", "_")) + ("=" if m.group(2) else "")

    return _FLAG.sub(name, message)


class OptionError(CogalignError, ValueError):
    """An option value is invalid; the message names the option and the fix.

    It is written with the command-line flags: `cli_message` keeps that wording (what the CLI prints),
    while `str(error)` names the Python parameters (`px_resolution=1x1`, `vq_precision='half'`), as a
    caller of `ExpandOptions`, `Runtime` or `expand()` passed them."""

    def __init__(self, message: str):
        super().__init__(python_wording(message))
        self.cli_message = message

    def __reduce__(self):  # pickled (a worker process): keep the flag wording
        return type(self), (self.cli_message,)
