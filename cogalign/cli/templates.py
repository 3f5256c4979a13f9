"""`cogalign templates`: list, show and try out the cognition-alignment prompt templates."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from cogalign.cli.util import fail
from cogalign.errors import CogalignError
from cogalign.options import MAX_SEED, parse_resolution
from cogalign.errors import OptionError
from cogalign.targets.regions import check_regions, parse_regions, sample_region
from cogalign.targets.templates import KINDS, TemplateSampler

templates_app = typer.Typer(
    help="List, show and sample the prompt templates (Table 4: VQ, Table 5: RGB).",
    no_args_is_help=True,
)


class Kind(str, Enum):
    vq = "vq"
    px = "px"


class KindOrAll(str, Enum):
    vq = "vq"
    px = "px"
    all = "all"


TemplatesOption = typer.Option(
    None, "--templates", metavar="PATH",
    help="Directory with vq.txt/px.txt, or a .json/.yaml file {vq: [...], px: [...]}; "
         "a kind it lacks uses the shipped templates. Default: the shipped Table 4/5 templates.",
)


def _sampler(templates: Optional[Path]) -> TemplateSampler:
    try:
        return TemplateSampler.from_path(templates)
    except CogalignError as exc:
        fail(exc)


@templates_app.command("list")
def list_templates(
    kind: KindOrAll = typer.Option(KindOrAll.all, "--kind", help="Which table to list: vq, px or all."),
    templates: Optional[Path] = TemplatesOption,
) -> None:
    """Print each template as KIND<TAB>ID<TAB>TEXT."""
    sampler = _sampler(templates)
    for k in KINDS if kind is KindOrAll.all else (kind.value,):
        for template_id, text in enumerate(sampler.templates(k)):
            typer.echo(f"{k}\t{template_id}\t{text}")


@templates_app.command("show")
def show(
    words: list[str] = typer.Argument(..., metavar="[KIND] ID", help="Template id, as printed by `templates list` "
                                      "(0-based), optionally after its kind as `list` prints it: `show 3`, `show px 3`."),
    kind: Kind = typer.Option(Kind.vq, "--kind", help="Which table: vq or px (a KIND before the ID wins)."),
    templates: Optional[Path] = TemplatesOption,
) -> None:
    """Print one template."""
    if len(words) > 2:
        fail(f"templates show {' '.join(words)}: give [KIND] ID, e.g. `cogalign templates show px 3`")
    kind_name, raw_id = words if len(words) == 2 else (kind.value, words[0])
    if kind_name not in [k.value for k in Kind]:
        fail(f"templates show {' '.join(words)}: the kind is vq or px, e.g. `cogalign templates show px 3`")
    try:
        template_id = int(raw_id)
    except ValueError:
        fail(f"templates show: {raw_id!r} is not a template id; give a number from `cogalign templates list`, "
             "e.g. `cogalign templates show vq 3`")
    items = _sampler(templates).templates(kind_name)
    if not 0 <= template_id < len(items):
        fail(f"{kind_name} template id {template_id} out of range 0..{len(items) - 1}")
    typer.echo(items[template_id])


@templates_app.command("sample")
def sample(
    kind: Kind = typer.Option(Kind.vq, "--kind", help="Which table to draw from: vq or px."),
    region: str = typer.Option(
        "upper-left", "--region",
        help="Region name, group (quarters, halves, all) or comma list, drawn uniformly per prompt."),
    resolution: str = typer.Option(
        "672", "--resolution", help="Working resolution N or HxW that the hint states."),
    length: str = typer.Option(
        "auto", "--length",
        help="VQ hint length: a number, or auto = (h/factor)*(w/factor) of the region. Ignored for px."),
    factor: int = typer.Option(
        8, "--factor", min=1, help="VQ tokenizer downsampling factor f; VQ boxes align to it."),
    seed: int = typer.Option(0, "--seed", min=0, max=MAX_SEED, help="Random seed for regions and templates (0 or more)."),
    count: int = typer.Option(3, "--count", min=1, help="How many prompts to print."),
    templates: Optional[Path] = TemplatesOption,
) -> None:
    """Print filled prompts, one per line: [ID] REGION (x0, y0, x1, y1): TEXT."""
    sampler = _sampler(templates)
    rng = np.random.default_rng(seed)
    try:
        names = parse_regions(region, option="region")
        height, width = parse_resolution(resolution)
        fixed_length = None if length == "auto" else _parse_length(length)
        align = factor if kind is Kind.vq else 1
        check_regions(names, (height, width), align, "resolution", "region")
        for _ in range(count):
            chosen = sample_region(rng, names, height, width, align)
            n = fixed_length if fixed_length is not None else (chosen.height // factor) * (chosen.width // factor)
            prompt = sampler.prompt(kind.value, rng, chosen, (height, width), n if kind is Kind.vq else None)
            typer.echo(f"[{prompt.template_id}] {chosen.name} {chosen.box}: {prompt.text}")
    except ValueError as exc:
        fail(exc)


def _parse_length(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise OptionError(f"--length {value!r}: expected a positive integer or auto") from None
    if n < 1:
        raise OptionError(f"--length {value!r}: expected a positive integer or auto")
    return n
