"""Named tokenizers and `load_tokenizer`, which takes a name, a Hub spec or a path.

Names: `demo` (shipped), `vqgan-4096` ($COGALIGN_HOME/tokenizers/vqgan-4096, else the Hub repo
named by $COGALIGN_VQGAN_4096 or by `tokenizers: {vqgan-4096: ...}` in $COGALIGN_HOME/config.yaml),
and the other entries of `catalog.KNOWN` (a Hub repo, or a folder you unpacked into
$COGALIGN_HOME/tokenizers/NAME). `hf://OWNER/REPO[@REV][/SUB]` goes through huggingface_hub."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import yaml

import cogalign.tokenizers.hub as hub
from cogalign.tokenizers.base import TokenizerError, VQTokenizer
from cogalign.tokenizers.catalog import BY_NAME, Known
from cogalign.tokenizers.checkpoints import CHECKPOINT_SUFFIXES
from cogalign.tokenizers.taming import load_taming

__all__ = [
    "DEMO_DIR", "VQGAN_4096_ENV", "cogalign_home", "vqgan_4096_dir", "config_file", "list_presets", "resolve",
    "check_installed", "is_local", "load_tokenizer", "load_decoder_spec",
]

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEMO_DIR = ASSETS / "demo-f8-4096"
VQGAN_4096_ENV = "COGALIGN_VQGAN_4096"


def cogalign_home() -> Path:
    """$COGALIGN_HOME, default ~/.cache/cogalign."""
    return Path(os.environ.get("COGALIGN_HOME") or Path.home() / ".cache" / "cogalign").expanduser()


def vqgan_4096_dir() -> Path:
    """Where `vqgan-4096` is installed (and `vq train --preset vqgan-4096` writes it):
    $COGALIGN_HOME/tokenizers/vqgan-4096."""
    return cogalign_home() / "tokenizers" / "vqgan-4096"


def config_file() -> Path:
    """$COGALIGN_HOME/config.yaml, which may map preset names to Hub repos (`tokenizers:`)."""
    return cogalign_home() / "config.yaml"


_DESCRIPTIONS = {
    "demo": "small f8 VQGAN with 4096 codes shipped with cogalign (cogalign/assets/demo-f8-4096), "
            "trained on the 13 example photos: for demos and tests, not for training models",
    "vqgan-4096": "the paper's f8 / 4096-code VQGAN: $COGALIGN_HOME/tokenizers/vqgan-4096 (train it with "
                  f"`cogalign vq train`), else the Hub repo named by ${VQGAN_4096_ENV}",
}


def list_presets() -> dict[str, str]:
    """Preset name -> one-line description."""
    return dict(_DESCRIPTIONS)


def _has_files(folder: Path) -> bool:
    """Whether the folder holds weights (itself or ckpts/), not only notes or an empty ckpts/."""
    return any(p.is_file() and p.suffix.lower() in CHECKPOINT_SUFFIXES
               for d in (folder, folder / "ckpts", folder / "checkpoints") if d.is_dir() for p in d.iterdir())


def _configured_repo(name: str) -> str | None:
    """The Hub repo for a preset: the environment variable, else the config file."""
    if name == "vqgan-4096" and os.environ.get(VQGAN_4096_ENV, "").strip():
        return os.environ[VQGAN_4096_ENV].strip()
    path = config_file()
    if not path.is_file():
        return None
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise TokenizerError(f"{path}: unreadable config ({' '.join(str(exc).split())[:120]}); fix or remove it") from None
    table = cfg.get("tokenizers") if isinstance(cfg, dict) else None
    if not isinstance(cfg, dict) or not isinstance(table or {}, dict):
        raise TokenizerError(f"{path}: expected a mapping like `tokenizers: {{{name}: OWNER/NAME}}`; fix or remove it")
    value = (table or {}).get(name)
    return str(value).strip() if value else None


def _as_hub(value: str) -> str:
    return value if hub.is_hub_spec(value) else hub.PREFIX + value


def resolve(spec: str) -> tuple[Path, str]:
    """A tokenizer spec -> (local checkpoint folder or file, name). Downloads Hub tokenizers."""
    spec = str(spec)
    if not spec.strip():  # Path("") is the working folder: it would load whatever checkpoint is there
        raise TokenizerError(f"the tokenizer spec is empty; pass a name ({', '.join(BY_NAME)}; see `cogalign vq "
                             "list`), hf://OWNER/REPO or a taming checkpoint folder (`.` for the working folder)")
    if spec == "demo":
        if not (DEMO_DIR / "model.safetensors").is_file():
            raise TokenizerError(f"{DEMO_DIR}: the demo tokenizer is missing from this install; reinstall cogalign")
        return DEMO_DIR, "demo-f8-4096"
    if hub.is_hub_spec(spec):
        hs = hub.parse_hub_spec(spec)
        path = hub.download(hs)
        return path, hub.resolved_name(hs, path)
    if spec in BY_NAME:
        path, name = _resolve_known(BY_NAME[spec])
        check_installed(BY_NAME[spec], path)
        return path, name
    path = Path(spec).expanduser()
    if not path.exists():
        raise TokenizerError(
            f"{spec}: no such file or folder, and not a preset or known tokenizer (names: {', '.join(BY_NAME)}; "
            "see `cogalign vq list`); pass a name, hf://OWNER/REPO or a taming checkpoint folder")
    return path, (path.name if path.is_dir() else path.stem)


def _resolve_known(k: Known) -> tuple[Path, str]:
    folder = cogalign_home() / "tokenizers" / k.name
    if _has_files(folder):
        return folder, k.name
    repo = k.source if k.kind == "hub" else _configured_repo(k.name) if k.kind == "local" else None
    if repo:  # recorded with the repo and the commit it resolved to, as an hf:// spec is
        hs = hub.parse_hub_spec(_as_hub(repo))
        path = hub.download(hs)
        return path, f"{k.name} ({hub.resolved_name(hs, path)})"
    if k.kind == "local":
        raise TokenizerError(
            f"{k.name} is not installed: looked in {folder} and found no Hub repo in ${VQGAN_4096_ENV} or in "
            f"{config_file()} (tokenizers: {{{k.name}: OWNER/NAME}}); either train it with "
            f"`cogalign vq train IMAGES --out {folder} --preset {k.name}`, or set {VQGAN_4096_ENV}=OWNER/NAME "
            "to a Hub repo that holds it (or pass --vq PATH to a checkpoint folder, or --vq hf://OWNER/NAME)")
    raise TokenizerError(
        f"{k.name} is not installed (looked in {folder}): download {k.source} (files: {k.files}), "
        f"put the checkpoint and its yaml in {folder}, then use --vq {k.name}")


def check_installed(k: Known, path: Path) -> None:
    """What is installed under a catalog name must be that tokenizer: codebook size, factor and
    code dimension as the catalog says (read from its yaml, before any weights)."""
    from cogalign.tokenizers.checkpoints import find_checkpoint, normalize_params, read_config

    _, cfg = find_checkpoint(path)
    params = normalize_params(read_config(cfg)[0], source=str(cfg))
    got = {"codes": params["n_embed"], "f": 2 ** (len(params["ddconfig"]["ch_mult"]) - 1), "embed_dim": params["embed_dim"]}
    want = {"codes": k.codes, "f": k.f, "embed_dim": k.embed_dim}
    diff = [f"{key} {got[key]} (catalog: {want[key]})" for key in want if got[key] != want[key]]
    if diff:
        raise TokenizerError(
            f"{path}: installed as {k.name}, but its config {cfg} describes another tokenizer: {', '.join(diff)}; "
            f"put {k.name}'s own files there (see `cogalign vq list`), or pass this one by its path (--vq {path})")


def is_local(k: Known) -> bool:
    """Whether `resolve` would find this tokenizer without a download."""
    if k.kind == "shipped":
        return (DEMO_DIR / "model.safetensors").is_file()
    folder = cogalign_home() / "tokenizers" / k.name
    if _has_files(folder):  # what `resolve` takes: usable only if it is that tokenizer
        try:
            check_installed(k, folder)
        except TokenizerError:
            return False
        return True
    repo = k.source if k.kind == "hub" else (_configured_repo(k.name) if k.name in _DESCRIPTIONS else None)
    if not repo:
        return False
    try:
        hs = hub.parse_hub_spec(_as_hub(repo))
    except TokenizerError:
        return False
    snaps = hub.hub_cache_dir() / ("models--" + hs.repo_id.replace("/", "--")) / "snapshots"
    return snaps.is_dir() and any(p.suffix in CHECKPOINT_SUFFIXES for p in snaps.rglob("*"))


def load_tokenizer(spec: str = "demo", device: str | torch.device = "cpu", trust_pickle: bool = False) -> VQTokenizer:
    """A name (`demo`, `vqgan-4096`, see `cogalign vq list`), `hf://OWNER/REPO[@REV][/SUB]`, or a
    path to a taming checkpoint folder or file."""
    path, name = resolve(spec)
    return load_taming(path, device=device, trust_pickle=trust_pickle, name=name)


def load_decoder_spec(spec: str, trust_pickle: bool = False):
    """The decoder half (`VQDecoder`) named like `load_tokenizer`: a name, hf://OWNER/REPO or a path."""
    from cogalign.tokenizers.decoder import load_decoder

    path, name = resolve(spec)
    return load_decoder(path, trust_pickle=trust_pickle, name=name)
