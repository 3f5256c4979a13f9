"""The --out folder of `vq train`: what a run owns there, and the resume state
(`train_state.pt`: weights, optimizers, EMA codebook, RNG, step, history)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from cogalign.tokenizers.base import TokenizerError
from cogalign.tokenizers.training.config import RUN_ONLY
from cogalign.tokenizers.training.export import CONFIG_FILE, METRICS_FILE, MODEL_FILE

STATE_FILE = "train_state.pt"
OWNED = (MODEL_FILE, CONFIG_FILE, METRICS_FILE, STATE_FILE, MODEL_FILE + ".tmp", STATE_FILE + ".tmp")


def prepare_out(out: Path, force: bool, resume: bool) -> None:
    """Refuse an --out that would be overwritten by accident or left with two checkpoints.

    - a file: refused;
    - an empty or missing folder: fine;
    - a folder with files: needs --resume (continue the run) or --force (replace what an
      earlier `vq train` wrote there); files that `vq train` never writes are never
      deleted, and other checkpoints there are refused because `--vq OUT` would then find
      two checkpoints."""
    from cogalign.tokenizers.checkpoints import CHECKPOINT_SUFFIXES

    if out.exists() and not out.is_dir():
        raise TokenizerError(f"--out {out}: is a file; give a folder (it will hold {MODEL_FILE} and {CONFIG_FILE})")
    if resume:
        if not (out / STATE_FILE).is_file():
            raise TokenizerError(f"--resume: {out / STATE_FILE} not found; start a new run without --resume")
        return
    if not out.exists() or not any(out.iterdir()):
        return
    if not force:
        raise TokenizerError(f"--out {out}: exists and is not empty; pass --force to replace an earlier "
                             "`vq train` output there, --resume to continue it, or pick a new folder")
    others = sorted(p.name for p in out.iterdir() if p.name not in OWNED and p.suffix.lower() in CHECKPOINT_SUFFIXES)
    if others:
        raise TokenizerError(f"--out {out}: holds other checkpoints ({', '.join(others)}) that `--vq {out}` would "
                             "find beside the new one; move them away or pick a new folder")
    present = [n for n in OWNED if (out / n).exists()]
    if present and not _written_by_vq_train(out):
        raise TokenizerError(f"--out {out}: holds {', '.join(present)} that `vq train` did not write; --force "
                             "replaces only an earlier `vq train` output: move them away or pick a new folder")
    for name in OWNED:
        (out / name).unlink(missing_ok=True)


def _written_by_vq_train(out: Path) -> bool:
    """Whether --out holds an earlier `vq train` output: its model.safetensors (the producer in its
    metadata) or its resume state (the run's keys)."""
    import json

    from safetensors import safe_open

    try:
        with safe_open(str(out / MODEL_FILE), "pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("cogalign", "{}"))
        if meta.get("producer") == "cogalign vq train":
            return True
    except Exception:  # noqa: BLE001 - missing, or not a safetensors file
        pass
    try:
        state = torch.load(out / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
        return isinstance(state, dict) and {"images_digest", "config", "step"} <= set(state)
    except Exception:  # noqa: BLE001 - missing or foreign
        return False


def images_digest(names: list[str]) -> str:
    h = hashlib.sha256()
    for n in names:
        h.update(n.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()[:16]


def save_state(out: Path, state: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    tmp.replace(out / STATE_FILE)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def loss_identity(cfg, vgg: Path | None) -> dict:
    """What shapes the loss beyond the settings: whether LPIPS runs, and on which VGG16 weights
    (by content, so the same file elsewhere is the same loss)."""
    return {"lpips": vgg is not None, "lpips_vgg_sha256": file_sha256(vgg) if vgg is not None else None}


def _lpips_text(ident: dict) -> str:
    sha = ident.get("lpips_vgg_sha256")
    return f"on (VGG16 file sha256 {sha[:12]}…)" if ident.get("lpips") else "off"


def load_state(out: Path, config: dict, digest: str, loss_id: dict | None = None) -> dict:
    """The saved state, after checking that it was made with the same settings and images."""
    path = out / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise TokenizerError(f"{path}: cannot read the resume state ({str(e).splitlines()[0][:200]})") from None
    saved = state.get("config", {})
    diff = sorted(k for k in config if k not in RUN_ONLY and saved.get(k) != config[k])
    if diff:
        shown = ", ".join(f"{k}: {saved.get(k)!r} then, {config[k]!r} now" for k in diff)
        raise TokenizerError(f"--resume: {out} was trained with other settings ({shown}); use the same ones")
    saved_id = state.get("loss_identity")
    if loss_id is not None and saved_id is not None and saved_id != loss_id:
        raise TokenizerError(
            f"--resume: {out} was trained with LPIPS {_lpips_text(saved_id)}, now it would be {_lpips_text(loss_id)}; "
            "a resume must keep the loss: give the same --lpips-vgg (or $COGALIGN_LPIPS_VGG) file")
    if state.get("images_digest") != digest:
        raise TokenizerError(f"--resume: {out} was trained on other images ({state.get('images')} then); "
                             "give the same images in the same order")
    if state["step"] >= config["steps"]:
        raise TokenizerError(f"--resume: {out} is already at step {state['step']}; raise --steps above it to train on")
    return state
