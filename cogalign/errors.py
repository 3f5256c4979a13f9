"""Error types shared by the stages. Each carries a short reason code and a one-line detail."""
from __future__ import annotations


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


class OptionError(CogalignError, ValueError):
    """An option value is invalid; the message names the option and the fix."""
