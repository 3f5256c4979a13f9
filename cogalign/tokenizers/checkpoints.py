"""Taming checkpoints on disk: find the checkpoint and its yaml, read the config, read the state
dict safely (`weights_only=True` unless the user trusts the pickle), keep the encoder-path keys
and check them against the model, hash them."""
from __future__ import annotations

import hashlib
import pickle
import types
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

from cogalign.tokenizers.base import RESUME_STATES, TokenizerError

__all__ = [
    "CHECKPOINT_SUFFIXES", "KEPT_PREFIXES", "DECODER_PREFIXES", "apply_attn_type", "hash_state_dict", "read_config",
    "normalize_params", "quantizer_kind", "find_checkpoint", "pickle_refusal", "read_state_dict", "strip_prefix",
    "select_model_keys", "decoder_shapes", "check_decoder", "check_state_dict",
]

CHECKPOINT_SUFFIXES = (".ckpt", ".pth", ".safetensors")
YAML_SUFFIXES = (".yaml", ".yml")
CHECKPOINT_FOLDERS = ("ckpts", "checkpoints")  # taming's log folders: ckpts/ (published), checkpoints/ (training logs)
# The model keys the encoder path uses; everything else in a checkpoint is ignored.
KEPT_PREFIXES = ("encoder.", "quant_conv.", "quantize.")
# quantize.* entries that some taming variants store but that do not affect the indices:
# EMAVectorQuantizer's running statistics and the remap buffer.
IGNORED_QUANTIZE_KEYS = frozenset({
    "quantize.embedding.cluster_size",
    "quantize.embedding.embed_avg",
    "quantize.used",
})
DDCONFIG_REQUIRED = ("ch", "ch_mult", "num_res_blocks", "z_channels", "resolution")
# latent-diffusion's ddconfig `attn_type`: "vanilla" is taming's AttnBlock; "none" (vq-f4-noattn)
# puts nn.Identity where the attention blocks were, so those weights are absent.
ATTN_TYPES = ("vanilla", "none")


def apply_attn_type(net: torch.nn.Module, ddconfig: dict) -> torch.nn.Module:
    """taming's Encoder/Decoder ignore `attn_type` (it lands in **ignore_kwargs) and always build
    mid.attn_1: with attn_type none, replace every attention block by nn.Identity, as
    latent-diffusion's make_attn does."""
    if ddconfig.get("attn_type", "vanilla") != "none":
        return net
    net.mid.attn_1 = torch.nn.Identity()
    for level in list(getattr(net, "down", [])) + list(getattr(net, "up", [])):
        level.attn = torch.nn.ModuleList(torch.nn.Identity() for _ in level.attn)
    return net

def hash_state_dict(sd: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of each tensor in sorted name order; hex[:16]."""
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------

def read_config(path: Path) -> tuple[dict, str | None]:
    """Read a taming model yaml -> (params, target). Accepts the taming layout
    `model: {target, params: {...}}`, a `{target, params}` mapping, or a bare params mapping."""
    try:
        with open(path, "r", encoding="utf-8") as fh:
            cfg = yaml.safe_load(fh)
    except OSError as exc:
        raise TokenizerError(f"{path}: cannot read the config ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        msg = " ".join(str(exc).split())
        raise TokenizerError(f"{path}: not valid YAML ({msg}); it must be the taming model config") from None
    found = _find_params(cfg)
    if found is None:
        raise TokenizerError(
            f"{path}: no model params found; expected the taming layout "
            "`model: {target: ..., params: {embed_dim, n_embed, ddconfig: {...}}}` or a bare params mapping")
    return found


def _find_params(cfg: Any) -> tuple[dict, str | None] | None:
    if not isinstance(cfg, dict):
        return None
    model = cfg.get("model")
    if isinstance(model, dict) and isinstance(model.get("params"), dict):
        params = model["params"]
        first = params.get("first_stage_config")  # a latent-diffusion model: its VQ first stage
        if "ddconfig" not in params and isinstance(first, dict) and isinstance(first.get("params"), dict):
            return first["params"], first.get("target")
        return params, model.get("target")
    if isinstance(cfg.get("params"), dict) and "ddconfig" in cfg["params"]:
        return cfg["params"], cfg.get("target")
    if "ddconfig" in cfg:
        return cfg, cfg.get("target")
    return None


def normalize_params(params: dict, source: str = "config") -> dict:
    """Check and fill the params that the encoder path needs; return a clean copy."""
    missing = [k for k in ("embed_dim", "n_embed", "ddconfig") if k not in params]
    if missing:
        raise TokenizerError(f"{source}: model params lack {', '.join(missing)}; is this a taming VQ model config?")
    dd = params["ddconfig"]
    if not isinstance(dd, dict):
        raise TokenizerError(f"{source}: ddconfig must be a mapping, got {type(dd).__name__}")
    missing = [k for k in DDCONFIG_REQUIRED if k not in dd]
    if missing:
        raise TokenizerError(f"{source}: ddconfig lacks {', '.join(missing)}; is this a taming VQ model config?")
    if params.get("remap"):
        raise TokenizerError(
            f"{source}: the model remaps indices through {params['remap']!r} (taming's `remap`), which is not "
            "supported; remove `remap` from the config to emit raw codebook indices")
    dd = dict(dd)
    dd.setdefault("in_channels", 3)
    dd.setdefault("out_ch", 3)
    dd.setdefault("attn_resolutions", [])
    dd.setdefault("dropout", 0.0)
    # taming's Encoder defaults to double_z=True (a KL autoencoder); every VQ config sets it
    # False, because quant_conv takes z_channels inputs.
    dd.setdefault("double_z", False)
    try:
        dd["ch_mult"] = [int(m) for m in dd["ch_mult"]]
        dd["attn_resolutions"] = [int(r) for r in (dd["attn_resolutions"] or [])]
        for k in ("ch", "num_res_blocks", "z_channels", "resolution", "in_channels", "out_ch"):
            dd[k] = int(dd[k])
        out = dict(params)
        out["embed_dim"] = int(params["embed_dim"])
        out["n_embed"] = int(params["n_embed"])
    except (TypeError, ValueError) as exc:
        raise TokenizerError(f"{source}: a ddconfig/params value is not a number ({exc})") from None
    attn = dd.get("attn_type", "vanilla")
    if attn not in ATTN_TYPES:
        raise TokenizerError(f"{source}: ddconfig.attn_type={attn!r} is not supported (only {', '.join(ATTN_TYPES)}: "
                             "latent-diffusion's plain attention, or none as in vq-f4-noattn)")
    if dd["ch"] % 32:
        raise TokenizerError(f"{source}: ddconfig.ch={dd['ch']} must be a multiple of 32 (taming uses GroupNorm with 32 groups)")
    out["ddconfig"] = dd
    return out


def quantizer_kind(target: str | None, keys: set[str]) -> str:
    """"gumbel" for a GumbelVQ model (its yaml target names it, or it has quantize.proj and no
    codebook `quantize.embedding`), else "vq"."""
    if target and "gumbel" in str(target).lower():
        return "gumbel"
    if "quantize.embedding.weight" not in keys and "quantize.proj.weight" in keys:
        return "gumbel"
    return "vq"


# ---------------------------------------------------------------------------------------
# Finding the files
# ---------------------------------------------------------------------------------------

def _list(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)


def _has_params(path: Path) -> bool:
    try:
        with open(path, "r", encoding="utf-8") as fh:
            return _find_params(yaml.safe_load(fh)) is not None
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return False


def _pick_yaml(ckpt: Path, candidates: list[Path], where: str) -> Path:
    """Choose the model yaml for `ckpt` among `candidates` (same stem, then config.yaml,
    then the only one that holds model params)."""
    if not candidates:
        raise TokenizerError(
            f"{ckpt}: no model config found ({where}); put the taming model yaml beside the checkpoint "
            f"as {ckpt.stem}.yaml or config.yaml")
    for p in candidates:
        if p.stem == ckpt.stem:
            return p
    if len(candidates) == 1:
        return candidates[0]
    for p in candidates:
        if p.name in ("config.yaml", "config.yml"):
            return p
    with_params = [p for p in candidates if _has_params(p)]
    if len(with_params) == 1:
        return with_params[0]
    names = ", ".join(str(p) for p in (with_params or candidates))
    raise TokenizerError(
        f"{ckpt}: several model configs found ({names}); keep one, or name the right one {ckpt.stem}.yaml beside the checkpoint")


def _resume_state_error(path: Path, step: int | None = None) -> TokenizerError:
    """The one-line refusal of `vq train`'s resume state where a model checkpoint is expected."""
    at = f" (step {step})" if step is not None else ""
    return TokenizerError(
        f"{path}: the resume state of `cogalign vq train`{at}, not a model checkpoint; the trained model is "
        f"{path.parent / 'model.safetensors'} (with config.yaml), use that folder as it is")


def find_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """Resolve a tokenizer path to (checkpoint, yaml).

    `path` is a folder holding exactly one checkpoint (*.ckpt, *.pth, *.safetensors; also
    searched under ckpts/ or checkpoints/) and its model yaml (also under configs/), or a checkpoint file
    with its yaml beside it (same stem, config.yaml, or the only yaml there; also ../configs/).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise TokenizerError(f"{path}: no such file or folder")
    if path.is_dir():
        ckpts = [p for sub in ("", *CHECKPOINT_FOLDERS) for p in _list(path / sub, CHECKPOINT_SUFFIXES)]
        if not ckpts:
            raise TokenizerError(
                f"{path}: no checkpoint found (looked for *.ckpt, *.pth, *.safetensors in {path}, "
                f"{path / 'ckpts'} and {path / 'checkpoints'})")
        if len(ckpts) > 1:
            names = ", ".join(str(p) for p in ckpts)
            raise TokenizerError(
                f"{path}: {len(ckpts)} checkpoints found ({names}); pass the one to use as the path, e.g. "
                f"{next((p for p in ckpts if p.suffix == '.safetensors'), ckpts[0])}")
        ckpt = ckpts[0]
        yamls = _list(path, YAML_SUFFIXES) + _list(path / "configs", YAML_SUFFIXES)
        if ckpt.parent != path:
            yamls += _list(ckpt.parent, YAML_SUFFIXES)
        return ckpt, _pick_yaml(ckpt, yamls, f"looked for *.yaml in {path} and {path / 'configs'}")
    if path.suffix.lower() in YAML_SUFFIXES:
        raise TokenizerError(f"{path}: this is a config; pass the checkpoint file (or the folder holding both)")
    if path.name in RESUME_STATES:
        raise _resume_state_error(path)
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise TokenizerError(f"{path}: not a checkpoint (expected .ckpt, .pth or .safetensors)")
    folder = path.parent
    yamls = _list(folder, YAML_SUFFIXES)
    where = f"looked for *.yaml in {folder}"
    if not yamls and folder.name in CHECKPOINT_FOLDERS:
        yamls = _list(folder.parent / "configs", YAML_SUFFIXES)
        where += f" and {folder.parent / 'configs'}"
    return path, _pick_yaml(path, yamls, where)


# ---------------------------------------------------------------------------------------
# Reading checkpoints
# ---------------------------------------------------------------------------------------

def pickle_refusal(path: Path) -> TokenizerError:
    """The one-line error for a checkpoint that pickles objects besides tensors, naming the
    `vq convert --trust-pickle` fix."""
    return TokenizerError(
        f"{path}: this checkpoint pickles Python objects besides tensors; loading it would run code from the file. "
        f"Convert it once with `cogalign vq convert {path} <out.safetensors> --trust-pickle` "
        "(only if you trust its source), or pass --trust-pickle.")


class _Placeholder:
    """Stands in for a class that a trusted checkpoint pickles but that is not importable
    here (a Lightning callback, say): it keeps whatever state it is given."""

    def __init__(self, *args, **kwargs):
        self._args = args
        self._kwargs = kwargs

    def __setstate__(self, state):
        self.__dict__["_state"] = state


class _LenientUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_Placeholder,), {"__module__": "cogalign.placeholder." + module})


_lenient_pickle = types.ModuleType("cogalign_lenient_pickle")
_lenient_pickle.Unpickler = _LenientUnpickler
_lenient_pickle.load = lambda f, **kw: _LenientUnpickler(f, **kw).load()
_lenient_pickle.__name__ = "cogalign_lenient_pickle"


def read_state_dict(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a checkpoint's tensors: `state_dict` (Lightning) or the top level. .safetensors
    via safetensors; .ckpt/.pth with torch.load(weights_only=True) unless trust_pickle."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise TokenizerError(f"{path}: cannot read this safetensors file ({exc}); is it complete?") from None
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4 ...": noise before our own one-line verdict
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(str(path), map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError:
        if not trust_pickle:
            raise pickle_refusal(path) from None
        raise TokenizerError(f"{path}: not a readable torch checkpoint (unpickling failed)") from None
    except (ImportError, AttributeError) as exc:
        if not trust_pickle:
            raise pickle_refusal(path) from None
        # trust_pickle: an object's class is not importable here (e.g. pytorch_lightning
        # callbacks): load again with placeholders for the missing classes.
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False, pickle_module=_lenient_pickle)
        except Exception as exc2:  # noqa: BLE001 - any failure here means the file is unusable
            raise TokenizerError(f"{path}: cannot unpickle ({exc}; then {exc2})") from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        msg = " ".join(str(exc).split())[:200]
        raise TokenizerError(f"{path}: not a readable torch checkpoint ({msg}); is the file complete?") from None
    if isinstance(obj, dict) and {"step", "model", "opt", "config"} <= set(obj):
        raise _resume_state_error(path, obj.get("step"))
    sd = obj
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        sd = obj["state_dict"]
    if not isinstance(sd, dict):
        raise TokenizerError(f"{path}: holds a {type(sd).__name__}, not a state dict (or a dict with 'state_dict')")
    return {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def strip_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """If the model sits under a prefix (e.g. latent diffusion's `first_stage_model.`), drop it."""
    if any(k.startswith("encoder.") for k in sd):
        return sd
    prefixes = {k[: -len("encoder.conv_in.weight")] for k in sd if k.endswith(".encoder.conv_in.weight")}
    if len(prefixes) == 1:
        p = prefixes.pop()
        return {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
    return sd


def select_model_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder-path tensors: encoder.*, quant_conv.*, quantize.* (minus known extras)."""
    sd = strip_prefix(sd)
    return {k: v for k, v in sd.items()
            if k.startswith(KEPT_PREFIXES) and k not in IGNORED_QUANTIZE_KEYS}


DECODER_PREFIXES = ("decoder.", "post_quant_conv.")


def decoder_shapes(params: dict) -> dict[str, tuple[int, ...]]:
    """Key -> shape of taming's Decoder and post_quant_conv for these model params (built on the
    meta device: no memory, no weights)."""
    import contextlib
    import io

    from taming.modules.diffusionmodules.model import Decoder

    params = normalize_params(params)
    dd = params["ddconfig"]
    with torch.device("meta"), contextlib.redirect_stdout(io.StringIO()):
        dec = apply_attn_type(Decoder(**dd), dd)
        pqc = torch.nn.Conv2d(params["embed_dim"], dd["z_channels"], 1)
    shapes = {"decoder." + k: tuple(v.shape) for k, v in dec.state_dict().items()}
    shapes.update({"post_quant_conv." + k: tuple(v.shape) for k, v in pqc.state_dict().items()})
    return shapes


def check_decoder(sd: dict[str, torch.Tensor], params: dict, ckpt: Path, cfg: Path) -> bool:
    """If `sd` holds any decoder.* / post_quant_conv.* key, they must match the yaml's Decoder
    exactly (keys and shapes), else one TokenizerError naming the differences. Returns whether
    a decoder is there."""
    found = {k: v for k, v in sd.items() if k.startswith(DECODER_PREFIXES)}
    if not found:
        return False
    expected = {k: torch.empty(shape, device="meta") for k, shape in decoder_shapes(params).items()}
    try:
        check_state_dict(found, expected, ckpt, cfg)
    except TokenizerError as exc:
        raise TokenizerError(str(exc).replace("weights do not match", "decoder weights do not match", 1)) from None
    return True


def _listing(names: list[str], n: int = 10) -> str:
    more = f", ... ({len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def check_state_dict(kept: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], ckpt: Path, cfg: Path) -> None:
    """Keys and shapes must match exactly; else one TokenizerError naming the differences."""
    missing = sorted(set(expected) - set(kept))
    unexpected = sorted(set(kept) - set(expected))
    wrong = sorted(k for k in set(kept) & set(expected) if tuple(kept[k].shape) != tuple(expected[k].shape))
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} ({_listing(missing)})")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} ({_listing(unexpected)})")
    if wrong:
        desc = [f"{k} {list(kept[k].shape)} vs config {list(expected[k].shape)}" for k in wrong]
        parts.append(f"wrong shape {len(wrong)} ({_listing(desc)})")
    hint = ""
    if not any(k.startswith("encoder.") for k in kept):
        hint = f"; no encoder.* keys at all (first keys: {_listing(sorted(kept) or ['none'], 5)})"
    raise TokenizerError(
        f"{ckpt}: weights do not match the model in {cfg}: " + "; ".join(parts) + hint
        + "; check that this yaml belongs to this checkpoint")
