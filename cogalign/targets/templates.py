"""Cognition-alignment prompts: Table 4 (VQ) and Table 5 (RGB) templates, filled per spec §5.

Each template contains "this image" exactly once; `fill` puts the region phrase
there and appends the resolution (and, for VQ, length) hint after one space.

    from cogalign.targets.templates import TemplateSampler
    from cogalign.targets.regions import Region
    sampler = TemplateSampler()                    # shipped templates; or TemplateSampler.from_path("my.yaml")
    region = Region("upper-left", (0, 0, 336, 336))
    prompt = sampler.prompt("vq", 0, region, (672, 672), length=1764)   # seed or np.random.Generator
    print(prompt.template_id, prompt.text)
"""
from __future__ import annotations

import codecs
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import orjson
import yaml

from cogalign.errors import CogalignError
from cogalign.targets.regions import Region
from cogalign.targets.splice import FORBIDDEN

__all__ = ["TemplateSampler", "Prompt", "load_templates", "validate_templates", "shipped_templates_dir", "KINDS",
           "SLOT"]

KINDS = ("vq", "px")
SLOT = "this image"


def shipped_templates_dir() -> Path:
    """`cogalign/_templates` in a built wheel, else `<repo>/templates` in a source checkout."""
    package = Path(__file__).resolve().parents[1]
    packaged = package / "_templates"
    return packaged if packaged.is_dir() else package.parent / "templates"


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the first template
    except (OSError, UnicodeDecodeError) as exc:
        raise CogalignError(f"{path}: cannot read templates ({exc}); give a UTF-8 text file, one template per line") from None
    lines = (line.lstrip("\ufeff").strip() for line in text.splitlines())  # files joined with `cat` keep theirs
    return [line for line in lines if line]


def _read_mapping(path: Path) -> dict:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CogalignError(f"{path}: cannot read templates ({exc})") from None
    raw = raw.removeprefix(codecs.BOM_UTF8)  # a byte-order mark is not part of the first key or template
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise CogalignError(f"{path}: not valid JSON ({exc}); fix the syntax") from None
    else:
        try:
            data = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            detail = " ".join(str(exc).split())
            raise CogalignError(f"{path}: not valid YAML ({detail}); fix the syntax") from None
    if not isinstance(data, dict):
        raise CogalignError(f'{path}: expected a mapping like {{"vq": [...], "px": [...]}}, got {type(data).__name__}')
    return data


def _read_user(path: Path) -> dict:
    if path.is_dir():
        files = {kind: path / f"{kind}.txt" for kind in KINDS if (path / f"{kind}.txt").is_file()}
        found = {kind: validate_templates({kind: _read_lines(file)}, str(file))[kind] for kind, file in files.items()}
        if not found:
            raise CogalignError(f"{path}: no vq.txt or px.txt in this directory; add one template per line")
        return found
    if not path.exists():
        raise CogalignError(f"{path}: templates file not found; give a directory with vq.txt/px.txt or a .json/.yaml file")
    if path.suffix.lower() in (".json", ".yaml", ".yml"):
        return _read_mapping(path)
    raise CogalignError(f"{path}: unsupported templates file; use a directory with vq.txt/px.txt or a .json, .yaml or .yml file")


def validate_templates(templates: Mapping[str, object], source: str) -> dict[str, list[str]]:
    """Check every template of every kind given; raise CogalignError naming the source, kind, template id and the fix."""
    checked: dict[str, list[str]] = {}
    for kind in templates:
        if kind not in KINDS:
            raise CogalignError(f"{source}: unknown template kind {kind!r}; use only {', '.join(KINDS)}")
        items = templates.get(kind)
        if not isinstance(items, (list, tuple)) or not items:
            raise CogalignError(f"{source}: {kind} templates must be a non-empty list of strings")
        for i, text in enumerate(items):
            where = f"{source}: {kind} template {i}"
            if not isinstance(text, str) or not text.strip():
                raise CogalignError(f"{where} is empty or not a string; give the prompt text")
            count = text.count(SLOT)
            if count != 1:
                raise CogalignError(f"{where} contains {SLOT!r} {count} times; it must appear exactly once "
                                    f"(the region phrase goes there): {text!r}")
            bad = [token for token in FORBIDDEN if token in text]
            if bad:
                raise CogalignError(f"{where} contains {bad[0]!r}; remove it (it would break the conversation format)")
        checked[kind] = list(items)
    return checked


def load_templates(path: str | Path | None = None) -> dict[str, list[str]]:
    """Shipped templates, or those of a directory (vq.txt, px.txt) or a .json/.yaml/.yml file.

    A kind missing from the user's source falls back to the shipped one.
    """
    user = validate_templates(_read_user(Path(path)), str(path)) if path is not None else {}
    shipped = shipped_templates_dir()
    missing = {kind: _read_lines(shipped / f"{kind}.txt") for kind in KINDS if kind not in user}
    return {**validate_templates(missing, str(shipped)), **user}


@dataclass(frozen=True)
class Prompt:
    """A filled prompt and the template it came from."""

    kind: str
    template_id: int
    text: str


def _rng(rng_or_seed: int | np.random.Generator) -> np.random.Generator:
    return rng_or_seed if isinstance(rng_or_seed, np.random.Generator) else np.random.default_rng(rng_or_seed)


class TemplateSampler:
    """Draws and fills templates; `content_hash` identifies the template set for provenance."""

    def __init__(self, templates: Mapping[str, list[str]] | None = None):
        """`templates` maps kind -> list of templates; a missing kind (or None) uses the shipped ones."""
        given = validate_templates(templates or {}, "<templates>")
        source = {**load_templates(), **given} if len(given) < len(KINDS) else given
        self._templates = {kind: tuple(source[kind]) for kind in KINDS}
        canonical = orjson.dumps({k: list(v) for k, v in self._templates.items()}, option=orjson.OPT_SORT_KEYS)
        self._hash = hashlib.sha256(canonical).hexdigest()[:16]

    @classmethod
    def from_path(cls, path: str | Path | None) -> "TemplateSampler":
        """A sampler over the templates at `path` (a folder, .json or .yaml), or the paper's when None."""
        return cls(load_templates(path))

    def _check_kind(self, kind: str) -> tuple[str, ...]:
        if kind not in self._templates:
            raise ValueError(f"unknown template kind {kind!r}; choose from {', '.join(KINDS)}")
        return self._templates[kind]

    def templates(self, kind: str) -> list[str]:
        """The templates of `kind` (`vq` or `px`), in file order."""
        return list(self._check_kind(kind))

    @property
    def content_hash(self) -> str:
        """Hash of the templates' content, recorded in provenance and the run fingerprint."""
        return self._hash

    def sample_id(self, kind: str, rng: np.random.Generator) -> int:
        """A template id drawn uniformly."""
        return int(rng.integers(len(self._check_kind(kind))))

    def hint(self, kind: str, resolution: tuple[int, int], length: int | None = None) -> str:
        """The resolution hint (and, for VQ, the number of indices to generate)."""
        self._check_kind(kind)
        h, w = resolution
        if kind == "px":
            return f"Note that the image resolution is [3, {h}, {w}]."
        if length is None:
            raise ValueError("a VQ hint needs the number of indices (length)")
        return f"Note that the image resolution is [3, {h}, {w}], so you should generate {length} indices"

    def fill(self, kind: str, template_id: int, region: Region | str, resolution: tuple[int, int],
             length: int | None = None) -> str:
        """Template `template_id` with the region phrase in place of "this image", then the hint."""
        items = self._check_kind(kind)
        if not 0 <= template_id < len(items):
            raise ValueError(f"{kind} template id {template_id} out of range 0..{len(items) - 1}")
        phrase = region.phrase() if isinstance(region, Region) else region
        return items[template_id].replace(SLOT, phrase, 1) + " " + self.hint(kind, resolution, length)

    def prompt(self, kind: str, rng_or_seed: int | np.random.Generator, region: Region | str,
               resolution: tuple[int, int], length: int | None = None) -> Prompt:
        """Draw a template and fill it."""
        template_id = self.sample_id(kind, _rng(rng_or_seed))
        return Prompt(kind, template_id, self.fill(kind, template_id, region, resolution, length))
