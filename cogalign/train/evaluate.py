"""`cogalign eval`: score answers {"id", "index", "turn", "kind", "text"} to the inserted turns
against the shards, with the package's own parsers (cogalign.targets.render).

Matching. A prediction names its record by `index` (its position in shard order, as `generate`
writes it; without it, by `id`, which must then name one record) and its turn by `turn` (the
conversation index; without it, an id's predictions of one kind answer its turns of that kind in
order). A turn
with several predictions is a duplicate: refused unless `allow_duplicates` says which one counts
("first" or "last" in file order). A turn with no prediction is `missing`: counted apart, not
scored. Predictions for ids or turns the shards do not have are `unknown_predictions`.

Scores. An answer cut before its end marker (`<rgb end>`, `<vq end>`), as `--max-new-tokens`
leaves it, is scored on the complete pixels / indices it gives, with format_ok false and counted
in `truncated`. An unreadable answer counts every value as wrong (RGB: 255 off). In JSON, `psnr`
is a number, the string "inf" for a perfect score (`mse` 0.0), and null only when n is 0.
"""
from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Optional

import numpy as np

from cogalign.errors import CogalignError
from cogalign.targets.render import RGB_END, RGB_START, VQ_END, VQ_START, parse_px, parse_vq

__all__ = ["score", "table", "truths", "read_predictions", "match", "pick", "psnr_json", "DUPLICATE_CHOICES"]

DUPLICATE_CHOICES = ("first", "last")
_PIXEL = re.compile(r"\s*\[\s*(\d{1,3})\s*,\s*(\d{1,3})\s*,\s*(\d{1,3})\s*\]\s*,?")
_INDEX = re.compile(r"\s*(\d+)\s*,")


def truths(data: Path) -> dict:
    """{(index, turn): (id, kind, true answer text)} from the shards; index is the record's position
    in shard order (as `generate` writes it)."""
    from cogalign.train.data import check_expand_output, shard_files
    from cogalign.train.generate import inserted_turns
    from cogalign.expand.writer import read_shard

    check_expand_output(data)  # scores over part of the turns would look like scores over all
    out, index = {}, 0
    for f in shard_files(data):
        for rec in read_shard(f):
            for i, kind in inserted_turns(rec):
                out[(index, i)] = (rec.get("id"), kind, rec["conversations"][i]["value"])
            index += 1
    return out


def read_predictions(path: Path) -> list[tuple]:
    """(line, id, kind, index or None, turn or None, text) per non-empty line."""
    out = []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                p = json.loads(line)
                where = [p.get("index"), p.get("turn")]
                if any(v is not None and (isinstance(v, bool) or not isinstance(v, int)) for v in where):
                    raise TypeError
                out.append((n, p["id"], str(p["kind"]), *where, str(p["text"])))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise CogalignError(f"{path} line {n}: expected JSON {{\"id\", \"kind\", \"text\"}} "
                                    "with optional integers \"index\" and \"turn\"") from None
            if out[-1][2] not in ("vq", "px"):  # else every such prediction passed for an unknown id
                raise CogalignError(f"{path} line {n}: kind {p['kind']!r}: expected \"vq\" or \"px\" (the kind of the "
                                    "inserted turn, as generate writes it)")
    return out


def match(true: dict, preds: list, path: Path) -> tuple[dict, int]:
    """({(index, turn): [(line, text), ...]}, unknown predictions)."""
    records_of, turns_of = defaultdict(set), defaultdict(list)
    for (index, i), (rid, kind, _) in true.items():
        records_of[rid].add(index)
        turns_of[(index, kind)].append(i)
    by_turn, unknown, used = defaultdict(list), 0, defaultdict(int)
    for line, rid, kind, index, turn, text in preds:
        if index is None:
            found = records_of.get(rid, ())
            if len(found) > 1:
                raise CogalignError(f"{path} line {line}: id {rid!r} names {len(found)} records of the shards: "
                                    "add \"index\" (the record's position, as `cogalign generate` writes it)")
            index = next(iter(found), None)
        if turn is None:
            options = turns_of.get((index, kind), [])
            j = used[(index, kind)]
            used[(index, kind)] += 1
            if j >= len(options) > 1:
                raise CogalignError(f"{path} line {line}: id {rid!r} has {len(options)} {kind} turns and more "
                                    "predictions without \"turn\": add \"turn\" (the conversation index) to each")
            turn = options[min(j, len(options) - 1)] if options else None
        if true.get((index, turn), (None, None))[:2] != (rid, kind):
            unknown += 1  # an id, turn or kind that the shards do not have there
            continue
        by_turn[(index, turn)].append((line, text))
    return by_turn, unknown


def pick(by_turn: dict, allow_duplicates: Optional[str], path: Path, true: dict) -> tuple[dict, int]:
    """({(index, turn): text}, turns with duplicates); refuses duplicates unless told which one wins."""
    dups = [(k, v) for k, v in by_turn.items() if len(v) > 1]
    if dups and allow_duplicates not in DUPLICATE_CHOICES:
        (index, turn), lines = dups[0]
        where = f"id {true[(index, turn)][0]!r} turn {turn}, record {index}: lines {', '.join(str(l) for l, _ in lines)}"
        raise CogalignError(f"{path}: {len(dups)} turns have more than one prediction (e.g. {where}); "
                            "pass --allow-duplicates first|last to say which one counts")
    at = -1 if allow_duplicates == "last" else 0
    return {k: v[at][1] for k, v in by_turn.items()}, len(dups)


def _truncated(pred: str, start: str, end: str) -> bool:
    return pred.startswith(start) and end not in pred


def _prefix_pixels(pred: str) -> np.ndarray:
    """The complete [r, g, b] triples at the start of an answer cut before `<rgb end>`."""
    body, pos, values = pred[len(RGB_START):].lstrip(), 1, []
    if not body.startswith("["):
        return np.zeros((0, 3), np.int64)
    while (m := _PIXEL.match(body, pos)) and max(map(int, m.groups())) <= 255:
        values.append([int(v) for v in m.groups()])
        pos = m.end()
    return np.array(values, np.int64).reshape(-1, 3)


def _prefix_indices(pred: str) -> np.ndarray:
    """The complete indices at the start of an answer cut before `<vq end>` (a last number may be cut)."""
    body, pos, values = pred[len(VQ_START):], 0, []
    while m := _INDEX.match(body, pos):
        values.append(int(m.group(1)))
        pos = m.end()
    return np.array(values, np.int64)


def _vq_score(true: str, pred: str) -> tuple[bool, float, float, bool]:
    """(format ok, index accuracy, length error, truncated)."""
    want = parse_vq(true)
    cut = _truncated(pred, VQ_START, VQ_END)
    try:
        got = _prefix_indices(pred) if cut else parse_vq(pred)
    except ValueError:
        return False, 0.0, 1.0, False
    n = min(len(got), len(want))
    acc = float((got[:n] == want[:n]).sum()) / max(len(want), 1)
    return not cut, acc, abs(len(got) - len(want)) / max(len(want), 1), cut


def _px_score(true: str, pred: str) -> tuple:
    """(format ok, exact, summed squared error, values scored, summed absolute error, truncated). A
    complete answer is scored on every true value (a missing or unreadable one counts as 255 off); an
    answer cut before `<rgb end>` on the pixels it gives."""
    want = parse_px(true).astype(np.int64)
    cut = _truncated(pred, RGB_START, RGB_END)
    try:
        got = _prefix_pixels(pred) if cut else parse_px(pred).astype(np.int64)
    except ValueError:
        got = None
    if got is None or (cut and not len(got)):
        return False, False, float(want.size) * 255.0 ** 2, want.size, float(want.size) * 255.0, cut
    n = min(len(got), len(want))
    diff = np.abs(got[:n] - want[:n])
    missing = 0 if cut else (len(want) - n) * 3
    sq = float((diff.astype(np.float64) ** 2).sum()) + missing * 255.0 ** 2
    exact = not cut and len(got) == len(want) and not diff.any()
    return not cut, exact, sq, diff.size + missing, float(diff.sum()) + missing * 255.0, cut


def psnr_json(mse: float):
    """PSNR in dB for JSON: the string "inf" for a perfect score (JSON has no infinity)."""
    return "inf" if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def score(data: Path, predictions: Path, allow_duplicates: Optional[str] = None) -> dict:
    """Scores of `predictions` (JSON lines) against the inserted turns of output folder `data`: VQ index accuracy
    and length error, RGB exact match, MAE and PSNR; missing, duplicate and cut answers counted apart."""
    true = truths(data)
    by_turn, unknown = match(true, read_predictions(predictions), predictions)
    chosen, dup_turns = pick(by_turn, allow_duplicates, predictions, true)
    sums = {"vq": defaultdict(float), "px": defaultdict(float)}
    for key, (_, kind, answer) in true.items():
        s = sums[kind]
        s["turns"] += 1
        s["duplicates"] += len(by_turn.get(key, ())) > 1
        if key not in chosen:
            s["missing"] += 1
            continue
        s["n"] += 1
        if kind == "vq":
            ok, acc, err, cut = _vq_score(answer, chosen[key])
            s["format_ok"] += ok; s["index_accuracy"] += acc; s["length_error"] += err; s["truncated"] += cut
        else:
            ok, exact, sq, size, ab, cut = _px_score(answer, chosen[key])
            s["format_ok"] += ok; s["exact_match"] += exact; s["truncated"] += cut
            s["sq"] += sq; s["abs"] += ab; s["values"] += size
    result = {"unknown_predictions": unknown, "duplicate_turns": dup_turns, "allow_duplicates": allow_duplicates}
    for kind, names in (("vq", ("format_ok", "index_accuracy", "length_error")), ("px", ("format_ok", "exact_match"))):
        s = sums[kind]
        n = int(s["n"])
        r = result[kind] = {"n": n, "missing": int(s["missing"]), "duplicates": int(s["duplicates"]),
                            "truncated": int(s["truncated"])}
        r.update({k: (s[k] / n if n else None) for k in names})
    px, s = result["px"], sums["px"]
    mse = s["sq"] / s["values"] if s["values"] else None
    px.update({"mae": s["abs"] / s["values"] / 255.0 if s["values"] else None, "mse": mse,
               "psnr": None if mse is None else psnr_json(mse)})
    return result


def table(result: dict) -> list[str]:
    """The scores of `score` as the lines `cogalign eval` prints."""
    def f(v, pct=True):
        return "-" if v is None else (f"{100 * v:.1f}%" if pct else f"{v:.2f}")

    vq, px = result["vq"], result["px"]
    psnr = "-" if px["psnr"] is None else "inf (perfect)" if px["psnr"] == "inf" else f"{px['psnr']:.2f} dB"
    lines = [f"{'target':<6} {'n':>5} {'missing':>8}  {'format ok':>9}  scores",
             f"{'VQ':<6} {vq['n']:>5} {vq['missing']:>8}  {f(vq['format_ok']):>9}  index accuracy "
             f"{f(vq['index_accuracy'])}, length error {f(vq['length_error'])}",
             f"{'RGB':<6} {px['n']:>5} {px['missing']:>8}  {f(px['format_ok']):>9}  exact match "
             f"{f(px['exact_match'])}, MAE {f(px['mae'])} of 255, PSNR {psnr}"]
    for name, r, end in (("VQ", vq, VQ_END), ("RGB", px, RGB_END)):
        if r["truncated"]:
            lines.append(f"{name} answers cut before {end}: {r['truncated']} (scored on the values they give, format not ok)")
    if result["duplicate_turns"]:
        lines.append(f"turns with several predictions: {result['duplicate_turns']} (the {result['allow_duplicates']} one counts)")
    if vq["missing"] or px["missing"]:
        lines.append(f"turns without a prediction: {vq['missing'] + px['missing']} (missing, not scored)")
    if result["unknown_predictions"]:
        lines.append(f"predictions for unknown ids or turns: {result['unknown_predictions']} (not scored)")
    return lines
