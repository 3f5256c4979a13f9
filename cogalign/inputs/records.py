"""Records: stream LLaVA records from a JSON array or JSONL file with their position,
and check a record's shape.

Streaming never holds the whole file: JSON arrays go through ijson's C backend
(`ijson.items(f, "item", use_float=True)`: integers stay `int`, other numbers are
`float`, the same values `json.load` gives), JSONL through `orjson.loads` per line.

A record's position is its 0-based index among the records of the file: the array
element index, or for JSONL the index among non-blank lines (a blank or
whitespace-only line takes no position; a line that is not valid JSON does).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable, Iterator

import ijson
import orjson

from cogalign.errors import InputError, RecordError

__all__ = ["detect_format", "iter_records", "count_records", "loads_exact", "RecordCheck", "check_record", "REJECT_REASONS",
           "INDEX_KEY", "choice_index", "HashingReader"]

_BOM = b"\xef\xbb\xbf"
_WS = b" \t\r\n"
_CHUNK = 1 << 20
_JSON_BUF = 64 * 1024  # ijson's read size

#: Every reason `check_record` can raise, plus `invalid_json` from `iter_records`.
REJECT_REASONS = (
    "invalid_json",
    "not_an_object",
    "conversations_missing",
    "conversations_not_list",
    "conversations_empty",
    "turn_not_object",
    "turn_bad_role",
    "turn_value_not_string",
    "leading_system_turn",
    "roles_not_alternating",
    "odd_turn_count",
    "image_bad_type",
    "image_token_without_image",
    "image_count_mismatch",
    "image_remote_url",
    "image_conflict",
    "cogalign_index_bad",
)

#: A record key that carries the position its random choices are seeded by (spec §7), so that
#: the choices survive a filter, shuffle or stream that changes the record's position.
INDEX_KEY = "cogalign_index"
MAX_INDEX = 2**63 - 1


# ----------------------------------------------------------------------- reading

def _open(path) -> tuple[object, str]:
    p = os.fspath(path)
    try:
        f = open(p, "rb")
    except FileNotFoundError:
        raise InputError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{p}: is a directory, expected a .json or .jsonl file") from None
    except OSError as e:
        raise InputError(f"{p}: cannot open: {e.strerror or e}") from None
    return f, p


def _first_byte(f, p: str) -> tuple[int, int | None]:
    """(offset of the first non-whitespace byte after an optional UTF-8 BOM, that byte)."""
    head = f.read(len(_BOM))
    offset = len(_BOM) if head == _BOM else 0
    f.seek(offset)
    while True:
        chunk = f.read(65536)
        if not chunk:
            return offset, None  # empty or only whitespace
        stripped = chunk.lstrip(_WS)
        if stripped:
            return offset + len(chunk) - len(stripped), stripped[0]
        offset += len(chunk)


def detect_format(path) -> str:
    """`"json"` (a top-level array) or `"jsonl"`, from the first non-whitespace byte
    (`[` or `{`; a UTF-8 BOM is skipped). An empty or whitespace-only file is JSONL with
    no records (as `[]` is an array with none). `InputError` for a missing file, a file
    that starts with anything else, or a single pretty-printed JSON object."""
    f, p = _open(path)
    with f:
        offset, byte = _first_byte(f, p)
        if byte is None:
            return "jsonl"
        if byte == ord("["):
            return "json"
        if byte == ord("{"):
            f.seek(offset)
            first_line = f.readline().strip()
            if first_line == b"{":
                raise InputError(
                    f"{p}: looks like one pretty-printed JSON object; expected a JSON array of records "
                    "or JSONL (one record per line)"
                )
            return "jsonl"
    shown = chr(byte) if 32 <= byte < 127 else f"byte 0x{byte:02x}"
    raise InputError(f"{p}: neither a JSON array nor JSONL: the file starts with {shown!r}, expected '[' or '{{'")


@contextlib.contextmanager
def _opened(path):
    """(format, binary file positioned after any BOM, path string)."""
    fmt = detect_format(path)
    f, p = _open(path)
    with f:
        if f.read(len(_BOM)) != _BOM:
            f.seek(0)
        yield fmt, f, p


def _one_line(message: object, limit: int = 300) -> str:
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def iter_records(path, *, skip: Callable[[int], bool] | None = None) -> Iterator[tuple[int, object]]:
    """Yield `(position, record)` for every record of a LLaVA JSON or JSONL file, streaming
    (`cogalign.inputs.iter_input` reads every input kind, and hands LLaVA files to this).

    - JSON array: each element (any JSON value; `check_record` rejects non-objects).
      If the file turns out malformed part-way, `InputError("<path>: invalid JSON
      after record <i>: <message>")` is raised, `i` being the last position read
      (`before the first record` when none was); the records already yielded are valid.
      Integers beyond 64 bits are read exactly (a fallback re-read with ijson's Python
      backend); a number that overflows a double (`1e400`) is invalid JSON here, where
      `json.load` would give `inf`.
    - JSONL: one record per non-blank line. A line that is not valid JSON yields
      `(position, RecordError("invalid_json", "line N: <orjson message>"))` in place
      of the record (N is the 1-based line number in the file) and reading goes on.
      orjson is strict: NaN/Infinity, `1e400` and lone surrogates (`"\\ud800"`) are
      `invalid_json`; integers beyond 64 bits are kept exact (via `json.loads`).
    - `skip(position)` true: the position is counted but nothing is yielded for it;
      JSONL lines are then not even parsed (JSON array elements are parsed and dropped).
    """
    with _opened(path) as (fmt, f, p):
        if fmt == "json":
            yield from _iter_json(f, p, skip)
        else:
            yield from _iter_jsonl(f, skip)


# A surrogate escape (\\uD800-\\uDFFF) that is not half of a high+low pair. yajl (ijson's C
# backend) turns it into "?" silently; orjson (JSONL) rejects it. Both are `invalid_json`:
# the raw bytes are scanned for one as they stream, and on a hit the file is re-read with
# ijson's Python backend, which keeps the lone surrogate so the record can be named.
_SURROGATE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}"
                        rb"|\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_PAIR_LEN = 12
_LOW_PREFIX = re.compile(rb"(\\(u([dD]([c-fC-F][0-9a-fA-F]?)?)?)?)?")


class _SurrogateScan:
    """A binary file wrapper whose `read` notes whether a lone surrogate escape went by.

    It is set before yajl can finish the string that holds it: a high half is judged
    at once unless the chunk ends inside what may be its low half's escape (then the
    string cannot be closed yet), and judged with the next chunk."""

    def __init__(self, f):
        self.f, self.tail, self.found = f, b"", False

    def read(self, size: int = -1) -> bytes:
        chunk = self.f.read(size)
        if self.found:
            return chunk
        if b"\\u" not in chunk and b"\\" not in self.tail:  # no \u escape starts here (most chunks)
            self.tail = chunk[-2:] or self.tail  # a backslash that may start one, and the byte before it
        else:
            self._scan(self.tail + chunk, eof=not chunk)
        return chunk

    def _scan(self, buf: bytes, eof: bool) -> None:
        cut = buf.rfind(b"\\", max(0, len(buf) - 5))  # an escape cut short by the chunk's end...
        self.tail = buf[max(0, cut - 1):] if cut >= 0 else buf[-1:]  # ...and the byte before it
        for m in _SURROGATE.finditer(buf):
            if m.start() == 0 or buf[m.start() - 1] == 0x5C:
                # after a backslash (`\\\\ud800…` is text, not an escape) or where that is not
                # known: let the Python backend decide (rare; only costs speed)
                self.found = True
                return
            if m.end() - m.start() == _PAIR_LEN:
                continue
            rest = buf[m.end():m.end() + 6]
            if buf[m.start() + 3] in b"cdefCDEF" or len(rest) == 6 or eof or not _LOW_PREFIX.fullmatch(rest):
                self.found = True
                return
            self.tail = buf[m.start() - 1:]  # maybe a pair cut by the chunk's end


def _lone_surrogate(obj) -> str | None:
    """The first string (key or value) holding a lone surrogate, escaped for display."""
    stack = [obj]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if not v.isascii():
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    return _one_line(v.encode("ascii", "backslashreplace").decode(), 60)
        elif isinstance(v, dict):
            stack.extend(v)
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return None


def _iter_json(f, p: str, skip) -> Iterator[tuple[int, object]]:
    start = f.tell()
    index = -1
    backend = ijson  # the C backend (yajl2_c)
    scan = _SurrogateScan(f)
    items = backend.items(scan, "item", use_float=True, buf_size=_JSON_BUF)

    def reread(done: int):
        """Re-read with ijson's pure-Python backend (~15x slower), dropping `done` records."""
        f.seek(start)
        items = ijson.get_backend("python").items(f, "item", use_float=True)
        for _ in range(done):
            next(items)
        return items

    while True:
        try:
            obj = next(items)
        except StopIteration:
            if backend is ijson and scan.found:  # the hit came with the end of the file
                backend, items = None, reread(index + 1)
                continue
            return
        except (ijson.JSONError, ValueError, OSError) as e:
            if backend is ijson and ("integer overflow" in str(e) or scan.found):
                # yajl only holds 64-bit integers (not even -2**63); json.load takes any.
                # Re-read so that such files still read exactly like json.load.
                try:
                    backend, items = None, reread(index + 1)
                except (StopIteration, ijson.JSONError, ValueError, OSError):  # pragma: no cover - same bytes parsed fine before
                    raise InputError(f"{p}: invalid JSON after record {index}: {_one_line(e)}") from None
                continue
            where = f"after record {index}" if index >= 0 else "before the first record"
            raise InputError(f"{p}: invalid JSON {where}: {_one_line(e)}; repair the file (cut short? "
                             f"`python -m json.tool {os.path.basename(p)}` shows where), or give it as JSONL, whose bad lines "
                             "are rejected one by one") from None
        if backend is ijson and scan.found:
            # This record may hold the hit (yajl made it "?"): read it again, and the rest.
            backend, items = None, reread(index + 1)
            continue
        index += 1
        if skip is not None and skip(index):
            continue
        if backend is None:
            bad = _lone_surrogate(obj)
            if bad is not None:
                obj = RecordError("invalid_json", f"element {index}: a lone surrogate in {bad!r} "
                                                  "(not valid Unicode; remove or pair it)")
        yield index, obj


# orjson turns integers beyond 64 bits into floats (json.loads keeps them exact). Lines
# with a run of 19+ digits (anywhere, strings included) are parsed by `json.loads`
# instead; finding them costs about as much again as orjson itself, a cheap price
# for exact pass-through of every other key.
_DIGITS_TO_ZERO = bytes(48 if 48 <= i <= 57 else 120 for i in range(256))
_LONG_DIGIT_RUN = b"0" * 19  # orjson: floats for integers past int64 min (19 digits) or uint64 max (20)


def loads_exact(line: bytes | str) -> object:
    """`orjson.loads`, but integers beyond 64 bits come back exact (as `json.loads` gives them)."""
    obj = orjson.loads(line)
    raw = line.encode() if isinstance(line, str) else line
    if _LONG_DIGIT_RUN in raw.translate(_DIGITS_TO_ZERO):
        return json.loads(line)
    return obj


def _iter_jsonl(f, skip) -> Iterator[tuple[int, object]]:
    index = -1
    for lineno, line in enumerate(f, start=1):
        if not line.strip(_WS):
            continue
        index += 1
        if skip is not None and skip(index):
            continue
        try:
            obj = loads_exact(line)
        except (orjson.JSONDecodeError, ValueError) as e:
            yield index, RecordError("invalid_json", f"line {lineno}: {_one_line(e)}")
            continue
        yield index, obj


class HashingReader:
    """A binary file that hashes every byte it hands out, once, even across seeks back."""

    def __init__(self, f, digest=None):
        self.f, self.digest = f, digest or hashlib.sha256()
        self.hashed = 0  # bytes [0, hashed) are in the digest

    def read(self, n: int = -1) -> bytes:
        """Up to `n` bytes from the file, each hashed the first time it is read."""
        pos = self.f.tell()
        data = self.f.read(n)
        end = pos + len(data)
        if end > self.hashed:
            if pos > self.hashed:  # a seek forward: hash the gap too
                self.f.seek(self.hashed)
                while self.hashed < pos:
                    self.hashed += len(chunk := self.f.read(min(pos - self.hashed, 1 << 20)))
                    self.digest.update(chunk)
                self.f.seek(end)
            self.digest.update(data[self.hashed - pos:] if pos < self.hashed else data)
            self.hashed = end
        return data

    def drain(self) -> None:
        """Hash the rest of the file (what a parser left unread)."""
        while self.read(1 << 20):
            pass

    def tell(self) -> int:
        """The file's position."""
        return self.f.tell()

    def seek(self, *args) -> int:
        """Move in the file (`file.seek`); a gap skipped forward is hashed by the next `read`."""
        return self.f.seek(*args)


def count_records(path, digest=None) -> int:
    """The number of positions `iter_records` walks (skipped or not) in a LLaVA JSON or JSONL file.

    JSONL: non-blank lines, counted in binary chunks without parsing. JSON array: the
    top-level elements, counted by ijson (so a malformed file raises the same
    `InputError` as `iter_records`). `digest` (a `hashlib` object), if given, is fed
    every byte of the file as it streams: the input's identity for resume, at no extra read."""
    with _opened(path) as (fmt, f, p):
        if digest is not None:
            f = HashingReader(f, digest)
        if fmt == "json":
            # ijson's C parser is the cost here (~0.45 s for 200 MB); building each item
            # on top of it adds ~15%, less than routing every parse event through Python.
            count = 0
            for _ in _iter_json(f, p, None):
                count += 1
        else:
            count = _count_jsonl(f)
        if digest is not None:
            f.drain()
        return count


def _count_jsonl(f) -> int:
    count = 0
    pending = False  # the line not yet ended by b"\n" has a non-whitespace byte
    while True:
        chunk = f.read(_CHUNK)
        if not chunk:
            break
        pieces = chunk.split(b"\n")
        if len(pieces) == 1:  # no newline in this chunk: the current line goes on
            pending = pending or bool(pieces[0].strip(_WS))
            continue
        if pending or pieces[0].strip(_WS):
            count += 1
        for line in pieces[1:-1]:
            if line.strip(_WS):
                count += 1
        pending = bool(pieces[-1].strip(_WS))
    return count + pending


# ----------------------------------------------------------------------- checking

@dataclass(frozen=True)
class RecordCheck:
    """What to do with a well-formed record."""

    action: str  # "expand" | "pass"
    pass_reason: str  # "" for expand; "text_only" or "video" for pass
    image: str | None  # the image to expand on (the first one when `image` is a list)
    n_pairs: int  # number of (human, gpt) pairs
    warning: str = field(default="", compare=False)  # kept, counted: "image_token_missing"


_ROLES = ("human", "gpt")
REMOTE_SCHEMES = ("http://", "https://", "data:", "ftp://", "s3://", "gs://")


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _show(value: object) -> str:
    """A short, safe rendering of a role value (never repr() of a container)."""
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:40] + "…")
    if value is None or isinstance(value, (bool, int, float)):
        return _one_line(repr(value), 40)
    return _kind(value)


def check_record(obj: object) -> RecordCheck:
    """Check one record's shape; raise `RecordError` (and nothing else) for a reject.

    Checks, in this order: the record is an object; `conversations` is present, a
    list, non-empty; each turn is an object with `from` in {human, gpt} (a first turn
    from `system` is `leading_system_turn`; `{role, content}` turns are
    `turn_bad_role`) and a string `value`; roles alternate starting with human; the
    count is even; `image`, when present and not null, is a string or a non-empty
    list of strings, none a remote URL; the `<image>` tokens number as many as the
    images (none at all is kept with the warning `image_token_missing`).

    Passes: no `image` (or `image: null`) and no `<image>` token -> `text_only`, or
    `video` when the record has a non-null `video`. `id` is not checked. An expandable
    record's `cogalign_index`, when present, must be an integer from 0 to 2**63 - 1.
    Any Mapping (a `datasets` row) is read like a dict.
    """
    if not isinstance(obj, Mapping):
        raise RecordError("not_an_object", f"the record is {_kind(obj)}, expected an object")
    if "conversations" not in obj:
        hint = ""
        if "messages" in obj:
            hint = "; it has `messages` (a chat-format record?), cogalign expects LLaVA `conversations`"
        raise RecordError("conversations_missing", f"no `conversations` key{hint}")
    conv = obj["conversations"]
    if not isinstance(conv, list):
        raise RecordError("conversations_not_list", f"`conversations` is {_kind(conv)}, expected a list of turns")
    if not conv:
        raise RecordError("conversations_empty", "`conversations` is an empty list")

    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise RecordError("turn_not_object", f"turn {i} is {_kind(turn)}, expected an object {{from, value}}")
        if "from" not in turn:
            if "role" in turn or "content" in turn:  # chat turns left unconverted: name what blocked them
                raise RecordError(
                    "turn_bad_role",
                    f"turn {i} is a {{role, content}} turn with role {_show(turn.get('role'))}; cogalign converts "
                    "only the roles user, assistant (human, gpt, system) to LLaVA {from, value}",
                )
            raise RecordError("turn_bad_role", f"turn {i} has no `from`; expected 'human' or 'gpt'")
        role = turn["from"]
        if i == 0 and role == "system":
            raise RecordError(
                "leading_system_turn",
                "turn 0 is from 'system'; LLaVA drops it, so cogalign does not guess: remove it first",
            )
        if not (isinstance(role, str) and role in _ROLES):
            raise RecordError("turn_bad_role", f"turn {i} is from {_show(role)}; expected 'human' or 'gpt'")
        if "value" not in turn:
            raise RecordError("turn_value_not_string", f"turn {i} has no `value`")
        if not isinstance(turn["value"], str):
            raise RecordError("turn_value_not_string", f"turn {i}: `value` is {_kind(turn['value'])}, expected a string")

    for i, turn in enumerate(conv):
        expected = _ROLES[i % 2]
        if turn["from"] != expected:
            raise RecordError(
                "roles_not_alternating",
                f"turn {i} is from {turn['from']!r}, expected {expected!r} (turns must alternate human, gpt, starting with human)",
            )
    if len(conv) % 2:
        raise RecordError("odd_turn_count", f"{len(conv)} turn{'s' if len(conv) != 1 else ''}: the last human turn has no gpt answer")

    n_pairs = len(conv) // 2
    tokens = sum(turn["value"].count("<image>") for turn in conv)
    image = obj.get("image")
    if image is None:
        if obj.get("video") is not None:  # LLaVA-NeXT video records use `<image>` for the frames
            return RecordCheck("pass", "video", None, n_pairs)
        if tokens:  # `image: null`, a {bytes: null, path: null} struct, an image part with no file
            raise RecordError("image_token_without_image", f"`<image>` appears {tokens} time{'s' * (tokens > 1)} but "
                              "the record has no usable image (`image` is missing, null or an empty struct); "
                              "give the image, or remove the token for a text-only record")
        return RecordCheck("pass", "text_only", None, n_pairs)
    images = image if isinstance(image, list) else [image]
    if isinstance(image, list) and not image:
        raise RecordError("image_bad_type", "`image` is an empty list")
    for j, item in enumerate(images):
        if not isinstance(item, str):
            where = f"`image`[{j}]" if isinstance(image, list) else "`image`"
            raise RecordError("image_bad_type", f"{where} is {_kind(item)}, expected a string"
                              + ("" if isinstance(image, list) else " or a list of strings"))
        if item.startswith(REMOTE_SCHEMES):
            raise RecordError("image_remote_url", f"image {_show(item)} is a remote URL; cogalign does not fetch "
                              "images while expanding: download it and give its local path")
    if tokens and tokens != len(images):
        raise RecordError("image_count_mismatch", f"{len(images)} image{'s' * (len(images) > 1)} but `<image>` "
                          f"appears {tokens} times; LLaVA pairs them in order: give one token per image")
    choice_index(obj, 0)  # a bad `cogalign_index` is refused before any work
    return RecordCheck("expand", "", images[0], n_pairs, "" if tokens else "image_token_missing")


def choice_index(record: Mapping, position: int) -> int:
    """The position a record's random choices are seeded by (spec §7): its `cogalign_index` when it
    has one (an integer from 0 to 2**63 - 1, else `RecordError("cogalign_index_bad")`; null counts as
    none, as a column's empty cell), else `position` (its position in the input)."""
    value = record.get(INDEX_KEY)
    if value is None:
        return position
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INDEX:
        raise RecordError("cogalign_index_bad", f"`{INDEX_KEY}` is {_show(value)}, expected an integer from 0 to "
                          f"{MAX_INDEX} (the position the record's choices are seeded by)")
    return int(value)
