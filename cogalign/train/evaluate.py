"""`cogalign eval`: score answers {"id", "kind", "text"} to the inserted turns against the shards,
with the package's own parsers (cogalign.render)."""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from cogalign.errors import CogalignError
from cogalign.render import parse_px, parse_vq


def truths(data: Path) -> dict:
    """{(id, kind): [true answer texts in turn order]} from the shards."""
    from cogalign.train.data import shard_files
    from cogalign.train.generate import inserted_turns
    from cogalign.writer import read_shard

    out = defaultdict(list)
    for f in shard_files(data):
        for rec in read_shard(f):
            for i, kind in inserted_turns(rec):
                out[(rec.get("id"), kind)].append(rec["conversations"][i]["value"])
    return out


def read_predictions(path: Path) -> dict:
    out = defaultdict(list)
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                p = json.loads(line)
                out[(p["id"], p["kind"])].append(str(p["text"]))
            except (ValueError, KeyError, TypeError):
                raise CogalignError(f"{path} line {n}: expected JSON {{\"id\", \"kind\", \"text\"}}") from None
    return out


def _vq_score(true: str, pred) -> tuple[bool, float, float]:
    want = parse_vq(true)
    try:
        got = parse_vq(pred) if pred is not None else None
    except ValueError:
        got = None
    if got is None:
        return False, 0.0, 1.0
    n = min(len(got), len(want))
    acc = float((got[:n] == want[:n]).sum()) / max(len(want), 1)
    return True, acc, abs(len(got) - len(want)) / max(len(want), 1)


def _px_score(true: str, pred) -> tuple:
    """(format ok, exact, summed squared error, values, summed absolute error); a missing or
    unreadable value counts as 255 off."""
    want = parse_px(true).astype(np.int64)
    try:
        got = parse_px(pred).astype(np.int64) if pred is not None else None
    except ValueError:
        got = None
    if got is None:
        return False, False, float(want.size) * 255.0 ** 2, want.size, float(want.size) * 255.0
    n = min(len(got), len(want))
    diff = np.abs(got[:n] - want[:n])
    missing = (len(want) - n) * 3
    sq = float((diff.astype(np.float64) ** 2).sum()) + missing * 255.0 ** 2
    exact = len(got) == len(want) and not diff.any()
    return True, exact, sq, want.size, float(diff.sum()) + missing * 255.0


def score(data: Path, predictions: Path) -> dict:
    true, pred = truths(data), read_predictions(predictions)
    vq, px = defaultdict(float), defaultdict(float)
    for (rid, kind), answers in true.items():
        guesses = pred.get((rid, kind), [])
        for j, answer in enumerate(answers):
            guess = guesses[j] if j < len(guesses) else None
            if kind == "vq":
                ok, acc, err = _vq_score(answer, guess)
                vq["n"] += 1; vq["format_ok"] += ok; vq["index_accuracy"] += acc; vq["length_error"] += err
            else:
                ok, exact, sq, size, ab = _px_score(answer, guess)
                px["n"] += 1; px["format_ok"] += ok; px["exact_match"] += exact
                px["sq"] += sq; px["abs"] += ab; px["values"] += size
    unknown = sum(len(v) for k, v in pred.items() if k not in true)
    result = {"vq": {"n": int(vq["n"])}, "px": {"n": int(px["n"])}, "unknown_predictions": unknown}
    if vq["n"]:
        result["vq"].update({k: vq[k] / vq["n"] for k in ("format_ok", "index_accuracy", "length_error")})
    else:
        result["vq"].update(dict.fromkeys(("format_ok", "index_accuracy", "length_error")))
    if px["n"]:
        mse = px["sq"] / max(px["values"], 1)
        result["px"].update({"format_ok": px["format_ok"] / px["n"], "exact_match": px["exact_match"] / px["n"],
                             "mae": px["abs"] / max(px["values"], 1) / 255.0,
                             "psnr": None if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)})
    else:
        result["px"].update(dict.fromkeys(("format_ok", "exact_match", "mae", "psnr")))
    return result


def table(result: dict) -> list[str]:
    def f(v, pct=True):
        return "-" if v is None else (f"{100 * v:.1f}%" if pct else f"{v:.2f}")

    vq, px = result["vq"], result["px"]
    lines = [f"{'target':<6} {'n':>5}  {'format ok':>9}  scores",
             f"{'VQ':<6} {vq['n']:>5}  {f(vq['format_ok']):>9}  index accuracy {f(vq['index_accuracy'])}, "
             f"length error {f(vq['length_error'])}",
             f"{'RGB':<6} {px['n']:>5}  {f(px['format_ok']):>9}  exact match {f(px['exact_match'])}, "
             f"MAE {f(px['mae'])} of 255, PSNR {'inf (perfect)' if px['n'] and px['psnr'] is None else f(px['psnr'], False) + ' dB'}"]
    if result["unknown_predictions"]:
        lines.append(f"predictions for unknown ids: {result['unknown_predictions']} (not scored)")
    return lines
