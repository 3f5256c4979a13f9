"""Tokenizers on the Hugging Face Hub: `hf://OWNER/REPO[@REVISION][/SUBFOLDER]` through
huggingface_hub's standard cache (HF_HUB_CACHE, HF_HOME; HF_HUB_OFFLINE=1 uses the cache
alone), and `push`, which uploads a tokenizer folder with a generated model card."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

from cogalign.tokenizers.base import RESUME_STATES, TokenizerError

PREFIX = "hf://"
# What a tokenizer folder needs; anything else in the repo (samples, logs) is not downloaded.
WEIGHT_PATTERNS = ("*.safetensors", "*.ckpt", "*.pth", "*.yaml", "*.yml")
PUSHED = ("*.safetensors", "*.yaml", "*.yml", "train_metrics.json")
PICKLE_SUFFIXES = (".ckpt", ".pth", ".pt", ".bin", ".pkl")
# `vq train`'s resume state (optimizers, RNG): part of the run, not of the model; never uploaded.


__all__ = [
    "PREFIX", "HubSpec", "spec_text", "is_hub_spec", "parse_hub_spec", "snapshot_commit", "resolved_name",
    "check_repo_id", "hub_cache_dir", "hub_offline", "download", "pick_weights", "losses_line", "model_card",
    "push_plan", "push",
]


@dataclass(frozen=True)
class HubSpec:
    """A parsed `hf://OWNER/REPO[@REVISION][/SUBFOLDER]`: the repo id, the revision (None: the
    default branch) and the subfolder ("" for the repo root); `str()` writes it back."""

    repo_id: str
    revision: str | None = None
    subfolder: str = ""

    def __str__(self) -> str:
        return spec_text(PREFIX, self.repo_id, self.revision, self.subfolder)


def spec_text(prefix: str, repo_id: str, revision: str | None, path: str) -> str:
    """`PREFIXOWNER/NAME[@REVISION][/PATH]`, a revision holding `/` URL-encoded (`@refs%2Fpr%2F1`)."""
    rev = f"@{quote(revision, safe='')}" if revision else ""
    return f"{prefix}{repo_id}{rev}" + (f"/{path}" if path else "")


def is_hub_spec(spec: str) -> bool:
    """Whether `spec` names a Hub tokenizer (starts with `hf://`)."""
    return str(spec).startswith(PREFIX)


def parse_hub_spec(spec: str) -> HubSpec:
    """`hf://OWNER/REPO[@REVISION][/SUBFOLDER]` (a bare `OWNER/REPO` is accepted too). A revision
    holding `/` is written URL-encoded: `@refs%2Fpr%2F1` is the revision `refs/pr/1`."""
    rest = spec[len(PREFIX):] if is_hub_spec(spec) else spec
    parts = [p for p in rest.strip("/").split("/")]
    if len(parts) < 2 or not parts[0] or not parts[1] or any(not p or p in (".", "..") for p in parts):
        raise TokenizerError(f"{spec}: not a Hub tokenizer; write hf://OWNER/REPO, hf://OWNER/REPO@REVISION "
                             "(a revision with '/' URL-encoded: @refs%2Fpr%2F1) or hf://OWNER/REPO/SUBFOLDER")
    repo, _, revision = parts[1].partition("@")
    if not repo or (_ and not revision):
        raise TokenizerError(f"{spec}: empty repo name or revision; write hf://OWNER/REPO@REVISION")
    check_repo_id(f"{parts[0]}/{repo}", spec)
    return HubSpec(f"{parts[0]}/{repo}", unquote(revision) or None, "/".join(parts[2:]))


def snapshot_commit(path: str | Path) -> str | None:
    """The commit sha of the Hub cache snapshot that holds `path` (…/snapshots/<sha>/…)."""
    parts = Path(path).parts
    for i in range(len(parts) - 1):
        if parts[i] == "snapshots" and i + 1 < len(parts):
            return parts[i + 1]
    return None


def resolved_name(hs: HubSpec, path: str | Path) -> str:
    """The name a Hub tokenizer is recorded under: OWNER/REPO@COMMIT[/SUBFOLDER], the commit
    the revision (or the default branch) resolved to."""
    sha = snapshot_commit(path)
    return str(HubSpec(hs.repo_id, sha or hs.revision, hs.subfolder)).removeprefix(PREFIX)


def check_repo_id(repo_id: str, what: str, error: type = TokenizerError) -> None:
    """huggingface_hub's own rule for repo ids (letters, digits, '-', '_', '.'; at most 96 characters)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise error(f"{what}: {repo_id!r} is not a valid Hub repo id ({' '.join(str(exc).split())[:160]}); "
                    "write OWNER/NAME") from None


def hub_cache_dir() -> Path:
    """The standard cache, read at call time: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE asks for the cache alone (1, true, yes, on)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def download(spec: str | HubSpec) -> Path:
    """The local folder of a Hub tokenizer (its subfolder in the snapshot), downloading only the
    weights and configs (or, offline, finding them in the cache)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    hs = spec if isinstance(spec, HubSpec) else parse_hub_spec(spec)
    where = f"{hs.subfolder}/" if hs.subfolder else ""
    patterns = [where + p for p in WEIGHT_PATTERNS] + [where + d + "/*" for d in ("ckpts", "checkpoints", "configs")]
    cache = hub_cache_dir()
    offline = hub_offline()
    cached = None if offline else _cached_commit(hs, patterns, cache)
    if cached is not None:
        return pick_weights(cached)
    if not offline and _is_commit(hs.revision) and _hub_unreachable(hs.repo_id):
        raise _not_cached(hs, cache, offline)  # before huggingface_hub's ~25 s of retries listing the commit
    try:
        root = snapshot_download(hs.repo_id, revision=hs.revision, cache_dir=str(cache), allow_patterns=patterns,
                                 local_files_only=offline)
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise TokenizerError(f"{hs}: the Hub repo is not found or not accessible ({type(exc).__name__}); check the "
                             "name, or log in with `hf auth login` for a private or gated repo") from None
    except RevisionNotFoundError:
        raise TokenizerError(f"{hs}: revision {hs.revision!r} does not exist in {hs.repo_id}") from None
    except LocalEntryNotFoundError:
        raise _not_cached(hs, cache, offline) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        msg = " ".join(str(exc).split())[:200]
        raise TokenizerError(f"{hs}: download failed ({msg}); retry, or use a local copy with --vq PATH") from None
    folder = Path(root) / hs.subfolder if hs.subfolder else Path(root)
    if not folder.is_dir():
        raise TokenizerError(f"{hs}: no folder {hs.subfolder!r} in {hs.repo_id} (snapshot {root})")
    return pick_weights(folder)


def _not_cached(hs: HubSpec, cache: Path, offline: bool) -> TokenizerError:
    how = ("HF_HUB_OFFLINE=1 is set, so only the cache is used; unset it to download"
           if offline else "the Hub cannot be reached; download it once where it can")
    return TokenizerError(f"{hs}: not in the Hugging Face cache {cache} and {how}, or set HF_HUB_CACHE/HF_HOME "
                          "to the cache that holds it")


def _is_commit(revision: str | None) -> bool:
    import re

    return bool(re.fullmatch(r"[0-9a-f]{40}", revision or ""))


def _hub_unreachable(repo_id: str) -> bool:
    """Whether one request to the Hub fails in transport (no retries), as opposed to answering."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        HfApi().repo_info(repo_id)
    except HfHubHTTPError:  # an answer (not found, gated, 5xx): snapshot_download reports it
        return False
    except Exception as exc:
        return _transport_error(exc)
    return False


def _transport_error(exc: BaseException) -> bool:
    """A failure to reach the Hub: httpx transport errors (huggingface_hub >= 1.0), requests' before, OS errors."""
    return isinstance(exc, OSError) or type(exc).__module__.startswith(("httpx", "requests"))


def _cached_commit(hs: HubSpec, patterns: list[str], cache: Path) -> Path | None:
    """The cached folder of a revision that is a full commit hash (immutable) and whose cached snapshot
    already holds a checkpoint and a yaml, else None. huggingface_hub would list the commit's files on
    the Hub first; unreachable, that is ~25 s of retries before it falls back to this same cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    from cogalign.tokenizers.checkpoints import CHECKPOINT_FOLDERS, CHECKPOINT_SUFFIXES, YAML_SUFFIXES

    if not _is_commit(hs.revision):
        return None
    try:
        root = Path(snapshot_download(hs.repo_id, revision=hs.revision, cache_dir=str(cache),
                                      allow_patterns=patterns, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    folder = root / hs.subfolder if hs.subfolder else root
    files = [p for sub in ("", *CHECKPOINT_FOLDERS, "configs") for p in (folder / sub).glob("*") if p.is_file()]
    has_weights = any(p.suffix.lower() in CHECKPOINT_SUFFIXES for p in files)
    return folder if has_weights and any(p.suffix.lower() in YAML_SUFFIXES for p in files) else None


def pick_weights(folder: Path) -> Path:
    """A folder with both a .safetensors and a pickle checkpoint: the safetensors file."""
    st = sorted(folder.glob("*.safetensors"))
    others = [p for p in folder.iterdir() if p.suffix.lower() in (".ckpt", ".pth")]
    return st[0] if len(st) == 1 and others else folder


# ---------------------------------------------------------------------------------------
# push
# ---------------------------------------------------------------------------------------

def _yaml_params(folder: Path) -> dict:
    from cogalign.tokenizers.checkpoints import find_checkpoint, normalize_params, read_config

    ckpt, cfg = find_checkpoint(folder)
    params, target = read_config(cfg)
    params = normalize_params(params, source=str(cfg))
    params["_target"] = target
    params["_files"] = (Path(cfg).name, Path(ckpt).name)
    return params


def losses_line(metrics: dict) -> str:
    """Which losses a `vq train` run actually ran, from its train_metrics.json."""
    lpips = metrics.get("lpips")
    gan = metrics.get("gan_steps")
    if not metrics.get("disc_weight"):
        gan_text = "off"
    elif gan is None:  # written before gan_steps was recorded
        gan_text = f"weight {metrics['disc_weight']} from step {metrics.get('disc_start')}"
    elif gan:
        gan_text = f"on for {gan} steps (from step {metrics.get('disc_start')})"
    else:
        gan_text = f"off (the run ended before --disc-start {metrics.get('disc_start')})"
    parts = ["L1", f"LPIPS {'on' if lpips else 'off'}", f"PatchGAN {gan_text}", "commitment"]
    if metrics.get("mse_weight"):
        parts.insert(1, "MSE")
    return ", ".join(parts)


def model_card(folder: Path, repo_id: str, params: dict, metrics: dict | None) -> str:
    """README.md for a tokenizer repo: architecture, codebook size, f, training data, PSNR (when known)."""
    dd = params["ddconfig"]
    f = 2 ** (len(dd["ch_mult"]) - 1)
    metrics = metrics or {}
    ev = metrics.get("eval") or {}
    images = metrics.get("images")
    if isinstance(images, list):
        data = f"{len(images)} images" + (f" (e.g. {', '.join(Path(str(p)).name for p in images[:3])})" if images else "")
    elif isinstance(images, int):
        data = f"{images} images"
    else:
        data = metrics.get("data") or "not recorded (no train_metrics.json in the folder)"
    training = ""
    if metrics:
        training = (f"\n- Training: `cogalign vq train --preset {metrics.get('preset')}`, {metrics.get('steps')} steps of "
                    f"{metrics.get('batch_size')} x {metrics.get('crop')}² crops; losses: {losses_line(metrics)}")
    psnr = ev.get("psnr_db")
    psnr_line = (f"{psnr:.2f} dB at {ev.get('resolution')} px on {ev.get('images')} training images "
                 "(`cogalign vq eval`)") if isinstance(psnr, (int, float)) else "not measured"
    usage = ev.get("codebook_usage")
    usage_line = f"\n- Codebook usage: {100 * usage:.1f}% of codes" if isinstance(usage, (int, float)) else ""
    config_name, weights_name = params.get("_files") or ("config.yaml", "model.safetensors")
    return f"""---
library_name: cogalign
tags:
- vqgan
- image-tokenizer
- taming-transformers
---

# {repo_id.split('/')[-1]}

A VQGAN image tokenizer in the taming-transformers layout ({params.get('_target') or 'taming.models.vqgan.VQModel'}),
for `cogalign expand --vq hf://{repo_id}`.

- Architecture: taming Encoder/Decoder, ch {dd['ch']}, ch_mult {dd['ch_mult']}, residual blocks per
  level {dd['num_res_blocks']}, z_channels {dd['z_channels']}, attention at feature sizes {dd['attn_resolutions'] or 'none (no attention)'}
- Codebook: {params['n_embed']} codes of dimension {params['embed_dim']}
- Downsampling factor f: {f} (one index per {f}x{f} pixels)
- Training data: {data}{training}
- Reconstruction PSNR: {psnr_line}{usage_line}

Files: `{config_name}` (the taming model config) and `{weights_name}` (the weights as safetensors, no pickle).

```python
from cogalign.tokenizers import load_tokenizer
tok = load_tokenizer("hf://{repo_id}")
indices = tok.encode(images)  # (B, H, W, 3) uint8 -> (B, H/{f}, W/{f}) int64
```
"""


def push_plan(folder: str | Path, repo_id: str) -> tuple[list[Path], str]:
    """The files `push` uploads and the model card, or a TokenizerError when the folder is not
    a safetensors tokenizer (a pickle checkpoint is never uploaded)."""
    folder = Path(folder).expanduser()
    if repo_id.count("/") != 1 or "@" in repo_id:
        raise TokenizerError(f"--repo {repo_id!r}: expected OWNER/NAME, e.g. my-team/vqgan-4096")
    check_repo_id(repo_id, "--repo")
    if not folder.is_dir():
        raise TokenizerError(f"{folder}: not a folder; pass the tokenizer folder (safetensors + config.yaml)")
    pickles = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                     if p.suffix.lower() in PICKLE_SUFFIXES and p.name not in RESUME_STATES)
    weights = sorted(folder.glob("*.safetensors"))
    if pickles:
        first = folder / pickles[0]
        target = "" if weights else f" {first.with_suffix('.safetensors')}"
        hint = (f"convert it with `cogalign vq convert {first}{target} --trust-pickle` (only if you trust it), then "
                if not weights else "the folder already has its safetensors weights: ")
        raise TokenizerError(
            f"{folder}: holds a pickle checkpoint ({', '.join(pickles)}), which is never uploaded; "
            f"{hint}move the pickle out of the folder")
    if len(weights) != 1:
        raise TokenizerError(f"{folder}: needs exactly one .safetensors file, found {len(weights)}; "
                             "train with `cogalign vq train` or convert with `cogalign vq convert`")
    from cogalign.tokenizers.taming import load_taming

    load_taming(folder)  # weights and yaml must load together before anything is published
    params = _yaml_params(folder)
    metrics = None
    if (folder / "train_metrics.json").is_file():
        try:
            metrics = json.loads((folder / "train_metrics.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:  # it would be uploaded, and the card would say it is missing
            raise TokenizerError(f"{folder / 'train_metrics.json'}: not readable JSON ({' '.join(str(exc).split())[:120]}); "
                                 "fix it or move it out of the folder") from None
    files = sorted({p for pat in PUSHED for p in folder.glob(pat) if p.is_file()})
    return files, model_card(folder, repo_id.removeprefix(PREFIX), params, metrics)


def push(folder: str | Path, repo_id: str, private: bool = False, dry_run: bool = False, api=None) -> dict:
    """Create (or reuse) the model repo and upload the files and README.md in one commit."""
    repo_id = repo_id.removeprefix(PREFIX)
    files, card = push_plan(folder, repo_id)
    left_out = sorted(n for n in RESUME_STATES if (Path(folder).expanduser() / n).is_file())
    plan = {"repo_id": repo_id, "private": private, "files": [p.name for p in files] + ["README.md"],
            "left_out": left_out,
            "bytes": sum(p.stat().st_size for p in files) + len(card.encode()), "card": card}
    if dry_run:
        return plan
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = api or HfApi()
    ops = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in files]
    ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
    try:
        url = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        info = api.create_commit(repo_id, ops, commit_message="Upload tokenizer with cogalign vq push",
                                 repo_type="model")
    except HfHubHTTPError as exc:
        msg = " ".join(str(exc).split())[:200]
        raise TokenizerError(f"{repo_id}: upload failed ({msg}); check `hf auth login` and write access") from None
    except Exception as exc:  # offline mode, or the Hub out of reach
        if not _transport_error(exc):
            raise
        how = "HF_HUB_OFFLINE=1 is set; unset it to upload" if hub_offline() else "retry where the Hub can be reached"
        raise TokenizerError(f"{repo_id}: the Hub cannot be reached ({type(exc).__name__}); {how} "
                             "(--dry-run checks the folder without it)") from None
    plan["url"] = str(getattr(info, "commit_url", None) or url)
    return plan
