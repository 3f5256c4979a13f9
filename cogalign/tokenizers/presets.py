"""Named tokenizers (`demo`, `vqgan-4096`) and `load_tokenizer`, which takes a name or a path."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from cogalign.tokenizers.base import TokenizerError, VQTokenizer
from cogalign.tokenizers.taming import load_taming

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEMO_DIR = ASSETS / "demo-f8-4096"


def cogalign_home() -> Path:
    """$COGALIGN_HOME, default ~/.cache/cogalign."""
    return Path(os.environ.get("COGALIGN_HOME") or Path.home() / ".cache" / "cogalign").expanduser()


def vqgan_4096_dir() -> Path:
    return cogalign_home() / "tokenizers" / "vqgan-4096"


_DESCRIPTIONS = {
    "demo": "small f8 VQGAN with 4096 codes shipped with cogalign (cogalign/assets/demo-f8-4096), "
            "trained on the 13 example photos: for demos and tests, not for training models",
    "vqgan-4096": "the paper's f8 / 4096-code VQGAN, trained by you with `cogalign vq train` into "
                  "$COGALIGN_HOME/tokenizers/vqgan-4096 (no public taming-layout checkpoint exists)",
}


def list_presets() -> dict[str, str]:
    """Preset name -> one-line description."""
    return dict(_DESCRIPTIONS)


def _load_preset(spec: str, device, trust_pickle: bool) -> VQTokenizer:
    if spec == "demo":
        if not (DEMO_DIR / "model.safetensors").is_file():
            raise TokenizerError(f"{DEMO_DIR}: the demo tokenizer is missing from this install; reinstall cogalign")
        return load_taming(DEMO_DIR, device=device, name="demo-f8-4096")
    if spec == "vqgan-4096":
        home = vqgan_4096_dir()
        if not home.is_dir() or not any(home.iterdir()):
            raise TokenizerError(
                f"vqgan-4096 is not installed (looked in {home}): train it with "
                f"`cogalign vq train IMAGES --out {home} --codes 4096` or pass --vq PATH to a taming checkpoint folder")
        return load_taming(home, device=device, trust_pickle=trust_pickle, name="vqgan-4096")
    raise AssertionError(spec)


def load_tokenizer(spec: str = "demo", device: str | torch.device = "cpu", trust_pickle: bool = False) -> VQTokenizer:
    """A preset name (see `list_presets`) or a path to a taming checkpoint folder or file."""
    spec = str(spec)
    if spec in _DESCRIPTIONS:
        return _load_preset(spec, device, trust_pickle)
    path = Path(spec).expanduser()
    if not path.exists():
        raise TokenizerError(
            f"{spec}: no such file or folder, and not a preset (presets: {', '.join(_DESCRIPTIONS)}); "
            "pass a preset name or a taming checkpoint folder")
    return load_taming(path, device=device, trust_pickle=trust_pickle)
