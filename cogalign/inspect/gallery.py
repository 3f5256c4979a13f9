"""`cogalign gallery`: a static HTML page (DIR/index.html, images in DIR/img/) with the panels
of a sample of records, the prompts they were asked with, and the counts from report.json.
No server, no scripts, no external assets."""
from __future__ import annotations

import html
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
from PIL.PngImagePlugin import PngInfo

from cogalign.errors import CogalignError
from cogalign.inspect.panels import display, view_record
from cogalign.inspect.records import load_manifest

__all__ = ["write_gallery", "sample_records", "MARK", "PANEL_NAME", "FIGURE", "STYLE"]

MARK = "cogalign gallery"  # the Software text of the PNGs gallery writes: only those are ever replaced
PANEL_NAME = re.compile(r"rec\d{3}_\d+\.png")
FIGURE = 200  # panel width on the page (the PNGs are PANEL px; CSS scales them)
STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
.rec{background:#fff;border:1px solid #ddd;border-radius:6px;padding:12px;margin:14px 0}
.panels{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;width:%dpx}figure img{width:%dpx;height:%dpx;object-fit:contain;image-rendering:pixelated;background:#eee}
figcaption{font-size:12px;color:#444}.q{font-size:12px;color:#555;margin:6px 0;word-break:break-word}
.summary{display:flex;flex-wrap:wrap;gap:40px;align-items:flex-start}.summary h2{margin-top:8px}
""" % ((FIGURE,) * 3)


def _reason(message: str) -> str:
    """The reason code in a skipped record's message (image_missing, ...), else its first words."""
    m = re.search(r"\b(image_[a-z_]+|no decoder|passed through)\b", message)
    return m.group(1) if m else " ".join(message.split()[:4])


def _ours(path: Path) -> bool:
    """Is `path` a PNG that gallery wrote (its Software text is MARK)?"""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return getattr(im, "text", {}).get("Software") == MARK
    except Exception:
        return False


def _own_panels(dest: Path) -> list[Path]:
    """The panel PNGs in DIR/img/ that an earlier gallery wrote (marked; before marks: beside its index.html);
    CogalignError if a panel-named PNG there is someone else's (it would be replaced)."""
    img_dir = dest / "img"
    if not img_dir.is_dir():
        return []
    page = dest / "index.html"
    legacy = page.is_file() and "<title>cogalign gallery:" in page.read_text(encoding="utf-8", errors="replace")[:2000]
    named = sorted(f for f in img_dir.iterdir() if PANEL_NAME.fullmatch(f.name))
    theirs = [f.name for f in named if not (legacy or _ours(f))]
    if theirs:
        raise CogalignError(f"{img_dir}: holds {theirs[0]}{f' and {len(theirs) - 1} more' if len(theirs) > 1 else ''} "
                            "that cogalign gallery did not write (it would be replaced); choose an empty or new folder")
    return named


def sample_records(out: Path, n: int) -> list[dict]:
    """n expanded records spread evenly over the output (the first, the last and between). Only
    the chosen records are read whole."""
    from cogalign.inspect.records import locate, read_record

    expanded = [(path, row) for path, row, _, _ in locate(out, lambda rid, prov, pos: prov is not None)]
    if not expanded:
        raise CogalignError(f"{out}: no expanded records to show (see report.json for why)")
    picks = np.unique(np.linspace(0, len(expanded) - 1, min(n, len(expanded))).round().astype(int))
    return [read_record(*expanded[i]) for i in picks]


def _counts_table(report: dict | None) -> str:
    if not report:
        return "<p>report.json is not written yet (the run, or one of its slices, is unfinished).</p>"
    rows = [("input records", report.get("input")), ("expanded", report.get("expanded")),
            ("passed through", report.get("passed")), ("rejected", report.get("rejected"))]
    rows += [(f"passed: {k}", v) for k, v in sorted((report.get("pass_reasons") or {}).items())]
    rows += [(f"rejected: {k}", v) for k, v in sorted((report.get("reject_reasons") or {}).items())]
    rows += [(f"warning: {k}", v) for k, v in sorted((report.get("warnings") or {}).items())]
    return "<table>" + "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                               for k, v in rows) + "</table>"


def _options_line(manifest: dict) -> str:
    o = manifest.get("options", {})
    keys = ("targets", "regions", "vq_resolution", "px_resolution", "vq_scope", "resize", "resample", "seed",
            "tokenizer_name", "tokenizer_hash")
    return ", ".join(f"{k}={json.dumps(o.get(k))}" for k in keys if k in o)


def write_gallery(out: Path, dest: Path, n: int = 24, decoder=None, image_root: Path | None = None,
                  records: list[dict] | None = None, on_record=None) -> dict:
    """Write dest/index.html and dest/img/*.png for `records` (default: `sample_records(out, n)`);
    returns counts (records shown, skipped, images) and the page's path."""
    out, dest = Path(out), Path(dest)
    manifest = load_manifest(out)
    report = None
    if (out / "report.json").is_file():
        report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    records = sample_records(out, n) if records is None else records
    img_dir = dest / "img"
    own = _own_panels(dest)
    img_dir.mkdir(parents=True, exist_ok=True)
    for old in own:  # a rerun replaces the previous sample (its own PNGs alone)
        old.unlink()
    blocks, templates, skipped, images = [], Counter(), [], 0
    info = PngInfo()
    info.add_text("Software", MARK)
    for k, rec in enumerate(records):
        try:
            view = view_record(rec, manifest, decoder, image_root)
        except CogalignError as exc:
            skipped.append((rec.get("id"), str(exc)))
            continue
        finally:
            if on_record:
                on_record()
        figs = []
        for j, panel in enumerate(view.panels):
            name = f"rec{k:03d}_{j}.png"
            display(panel.pixels).save(img_dir / name, optimize=True, pnginfo=info)
            images += 1
            figs.append(f'<figure><img src="img/{name}" alt="{html.escape(panel.title)}">'
                        f"<figcaption><b>{html.escape(panel.title)}</b><br>{html.escape(panel.caption)}"
                        "</figcaption></figure>")
        qs = []
        for t in view.turns:
            templates[(t["kind"], t["template_id"])] += 1
            qs.append(f'<div class="q"><b>{t["kind"].upper()} prompt (template {t["template_id"]}):</b> '
                      f"{html.escape(t['question'])}</div>")
        blocks.append(f'<div class="rec"><b>id {html.escape(str(view.record_id))}</b> &middot; '
                      f"{html.escape(str(view.image))}<div class=\"panels\">{''.join(figs)}</div>{''.join(qs)}</div>")
    tpl_rows = "".join(f"<tr><td>{kind}</td><td>{tid}</td><td>{c}</td></tr>"
                       for (kind, tid), c in sorted(templates.items()))
    skipped_html = "".join(f"<li>{html.escape(m)}</li>" for _, m in skipped)  # the message names the record
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>cogalign gallery: {html.escape(out.name)}</title>
<link rel="icon" href="data:,"><style>{STYLE}</style></head><body>
<h1>cogalign gallery: {html.escape(str(out))}</h1>
<p>Each record: the region as the model saw it, then what its target text means (VQ indices decoded by the
tokenizer's decoder; the RGB dump drawn), with the PSNR of each against the region. Panels are scaled up
with nearest-neighbour sampling.</p>
<p class="q">Run options: {html.escape(_options_line(manifest))}</p>
<div class="summary"><div><h2>Counts (report.json)</h2>{_counts_table(report)}</div>
<div><h2>Templates used by the records shown</h2>
<table><tr><th>kind</th><th>template id</th><th>turns</th></tr>{tpl_rows}</table></div></div>
<h2>{len(blocks)} records</h2>{''.join(blocks)}
{f'<h2>Not shown</h2><ul>{skipped_html}</ul>' if skipped else ''}
</body></html>
"""
    (dest / "index.html").write_text(page, encoding="utf-8")
    if skipped and not blocks:  # an empty page is not a gallery: say why, and fail
        why = Counter(_reason(m) for _, m in skipped)
        raise CogalignError(f"none of the {len(skipped)} sampled records could be drawn "
                            f"({', '.join(f'{k}: {v}' for k, v in why.most_common())}); first: {skipped[0][1]}")
    return {"shown": len(blocks), "skipped": len(skipped), "images": images, "path": dest / "index.html",
            "skipped_records": skipped}

