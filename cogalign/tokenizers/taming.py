"""Taming-transformers VQGAN encoders (and latent-diffusion VQ first stages): model, loading.

Only the encoder path is built: taming `Encoder` -> `quant_conv` -> nearest codebook entry
(or, for a Gumbel model, the argmax of `quantize.proj`). The decoder, post_quant_conv and the
loss (discriminator, LPIPS) in a checkpoint are ignored.

Only `taming.modules.*` is imported: `taming.models` needs pytorch_lightning and does not
import cleanly.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import pickle
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import yaml
# Only taming.modules: taming.models needs pytorch_lightning and does not import cleanly.
from taming.modules.diffusionmodules.model import AttnBlock, Encoder

from cogalign.tokenizers.base import TokenizerError, VQTokenizer, resolve_device

CHECKPOINT_SUFFIXES = (".ckpt", ".pth", ".safetensors")
YAML_SUFFIXES = (".yaml", ".yml")
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
# Positions per lookup chunk are chosen so that chunk x codebook float32 stays near this
# (4 MB: cache-sized blocks are ~4x faster than one big distance matrix, and never more
# than a few MB is allocated, whatever the batch).
LOOKUP_CHUNK_BYTES = 4 << 20
_FLOAT32_TINY = torch.finfo(torch.float32).tiny


def _attn_forward(self, x: torch.Tensor) -> torch.Tensor:
    """taming's AttnBlock.forward, op for op, except that attention weights below the
    smallest normal float32 (~1.2e-38) are set to 0. A trained model's sharp attention
    leaves many such subnormal weights, and x86 CPUs multiply subnormals ~100x slower: the
    second bmm alone took 160 ms per 336x336 region. The flushed terms are below float32
    resolution of the sums they join, so the output is unchanged."""
    h_ = self.norm(x)
    q = self.q(h_)
    k = self.k(h_)
    v = self.v(h_)
    b, c, h, w = q.shape
    q = q.reshape(b, c, h * w).permute(0, 2, 1)
    k = k.reshape(b, c, h * w)
    w_ = torch.bmm(q, k) * (int(c) ** (-0.5))
    w_ = torch.nn.functional.softmax(w_, dim=2)
    w_ = w_.masked_fill_(w_ < _FLOAT32_TINY, 0.0)
    v = v.reshape(b, c, h * w)
    w_ = w_.permute(0, 2, 1)
    h_ = torch.bmm(v, w_).reshape(b, c, h, w)
    return x + self.proj_out(h_)


class AttnBlockNoSubnormal(AttnBlock):
    """taming's AttnBlock, run by `_attn_forward`; same parameters and state-dict keys."""

    forward = _attn_forward


def _build_encoder(ddconfig: dict) -> nn.Module:
    enc = Encoder(**ddconfig)
    for m in enc.modules():
        if type(m) is AttnBlock:
            m.__class__ = AttnBlockNoSubnormal
    return enc


class TamingVQTokenizer(VQTokenizer, nn.Module):
    """Encoder -> quant_conv -> codebook lookup, with the taming state-dict names.

    `config` holds the model params: `embed_dim`, `n_embed`, `ddconfig` (a taming model
    yaml's `model.params`). `quantizer` is "vq" (nearest of `quantize.embedding.weight`)
    or "gumbel" (argmax of `quantize.proj`, the deterministic form of taming's GumbelVQ).
    Weights are random until loaded; `load_taming` is the usual way to build one.
    """

    def __init__(self, config: dict, *, name: str = "taming", quantizer: str = "vq"):
        nn.Module.__init__(self)
        params = normalize_params(config, source=name)
        dd = params["ddconfig"]
        self.params = params
        self.quantizer = quantizer
        self.name = name
        self.codebook_size = int(params["n_embed"])
        self.embed_dim = int(params["embed_dim"])
        self.downsample = 2 ** (len(dd["ch_mult"]) - 1)
        self.device = torch.device("cpu")
        self.content_hash = ""
        self.encoder_batch = 1  # images per encoder call; see encode
        self.encoder = _build_encoder(dd)
        z = int(dd["z_channels"])
        self.quant_conv = nn.Conv2d(z, self.embed_dim, 1)
        self.quantize = nn.Module()
        if quantizer == "vq":
            self.quantize.embedding = nn.Embedding(self.codebook_size, self.embed_dim)
        elif quantizer == "gumbel":
            if self.embed_dim != z:
                raise TokenizerError(
                    f"{name}: a Gumbel VQGAN applies quantize.proj (z_channels={z} inputs) to quant_conv's "
                    f"output (embed_dim={self.embed_dim}); taming itself cannot run this config, so set embed_dim = z_channels")
            self.quantize.proj = nn.Conv2d(z, self.codebook_size, 1)
            self.quantize.embed = nn.Embedding(self.codebook_size, self.embed_dim)
        else:
            raise ValueError(f"quantizer must be 'vq' or 'gumbel', not {quantizer!r}")
        self.eval()
        self.requires_grad_(False)
        self.content_hash = hash_state_dict(self.state_dict())

    # -- nn.Module housekeeping ----------------------------------------------------------

    def train(self, mode: bool = True):  # a tokenizer is always in eval mode
        return nn.Module.train(self, False)

    def to_device(self, device: str | torch.device) -> "TamingVQTokenizer":
        self.device = resolve_device(device)
        self.encoder_batch = 8 if self.device.type == "cuda" else 1
        nn.Module.to(self, self.device)
        return self

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- encoding ------------------------------------------------------------------------

    def pre_quant(self, x: torch.Tensor) -> torch.Tensor:
        """Float (B, 3, H, W) in [-1, 1] -> quant_conv output (B, embed_dim, H/f, W/f)."""
        return self.quant_conv(self.encoder(x))

    def lookup(self, h: torch.Tensor) -> torch.Tensor:
        """quant_conv output (B, C, h, w) -> (B, h, w) int64 code indices."""
        b, c, hh, ww = h.shape
        if self.quantizer == "gumbel":
            return self.quantize.proj(h).argmax(dim=1)
        z = h.permute(0, 2, 3, 1).reshape(-1, c)
        return nearest_code(z, self.quantize.embedding.weight).view(b, hh, ww)

    def encode(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """See VQTokenizer.encode. The indices do not depend on how the caller batches, nor on
        the thread count (spec §7): convolution libraries pick kernels by batch size and split
        reductions by thread count, which moved ~0.1% of indices (near-ties) between a batch of
        4 and 4 batches of 1, or between 1 and 2 threads. So on CUDA the encoder always runs on
        groups of exactly `encoder_batch` images (the last padded with zeros); on CPU each image
        runs alone on one thread, and the images of a batch run side by side on
        `torch.get_num_threads()` threads (as fast as one image on all threads)."""
        pixels = self._check_images(images)
        b, h, w, _ = pixels.shape
        f = self.downsample
        out = np.empty((b, h // f, w // f), dtype=np.int64)
        n = max(1, int(self.encoder_batch))
        groups = [(s, min(s + n, b)) for s in range(0, b, n)]

        def run(group: tuple[int, int]) -> None:
            s, e = group
            with torch.inference_mode(), _no_tf32(self.device):
                x = pixels[s:e].to(self.device, non_blocking=True)
                if e - s < n:
                    x = torch.cat([x, x.new_zeros((n - (e - s),) + tuple(x.shape[1:]))])
                x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
                out[s:e] = self.lookup(self.pre_quant(x))[:e - s].to("cpu", torch.int64).numpy()

        if self.device.type != "cpu":
            for group in groups:
                run(group)
            return out
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            if threads == 1 or len(groups) == 1:
                for group in groups:
                    run(group)
            else:
                with ThreadPoolExecutor(min(threads, len(groups))) as pool:
                    list(pool.map(run, groups))
        finally:
            torch.set_num_threads(threads)
        return out


def nearest_code(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """argmin_k ||z - e_k||^2 for each row of z, computed as ||z||^2 + ||e||^2 - 2 z.e^T
    (taming's formula) in chunks of rows, so that no rows x codebook matrix bigger than
    a few MB is ever built."""
    n = z.shape[0]
    k = codebook.shape[0]
    chunk = max(1, LOOKUP_CHUNK_BYTES // (4 * k))
    e2 = torch.sum(codebook ** 2, dim=1)
    et = codebook.t().contiguous()
    out = torch.empty(n, dtype=torch.int64, device=z.device)
    for s in range(0, n, chunk):
        zc = z[s:s + chunk]
        # (||z||^2 + ||e||^2) - 2 z.e^T, in place: one chunk x codebook buffer.
        d = torch.add(torch.sum(zc ** 2, dim=1, keepdim=True), e2)
        d.addmm_(zc, et, alpha=-2)
        out[s:s + chunk] = torch.argmin(d, dim=1)
    return out


@contextlib.contextmanager
def _no_tf32(device: torch.device):
    """Keep CUDA convolutions and matmuls in true float32, so GPU indices match CPU ones."""
    if device.type != "cuda":
        yield
        return
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


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
    if dd["ch"] % 32:
        raise TokenizerError(f"{source}: ddconfig.ch={dd['ch']} must be a multiple of 32 (taming uses GroupNorm with 32 groups)")
    out["ddconfig"] = dd
    return out


def _quantizer_kind(target: str | None, keys: set[str]) -> str:
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


def find_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """Resolve a tokenizer path to (checkpoint, yaml).

    `path` is a folder holding exactly one checkpoint (*.ckpt, *.pth, *.safetensors; also
    searched under ckpts/) and its model yaml (also under configs/), or a checkpoint file
    with its yaml beside it (same stem, config.yaml, or the only yaml there; also ../configs/).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise TokenizerError(f"{path}: no such file or folder")
    if path.is_dir():
        ckpts = _list(path, CHECKPOINT_SUFFIXES) + _list(path / "ckpts", CHECKPOINT_SUFFIXES)
        if not ckpts:
            raise TokenizerError(
                f"{path}: no checkpoint found (looked for *.ckpt, *.pth, *.safetensors in {path} and {path / 'ckpts'})")
        if len(ckpts) > 1:
            names = ", ".join(str(p) for p in ckpts)
            raise TokenizerError(
                f"{path}: {len(ckpts)} checkpoints found ({names}); pass the one to use as the path, e.g. {ckpts[0]}")
        ckpt = ckpts[0]
        yamls = _list(path, YAML_SUFFIXES) + _list(path / "configs", YAML_SUFFIXES)
        if ckpt.parent != path:
            yamls += _list(ckpt.parent, YAML_SUFFIXES)
        return ckpt, _pick_yaml(ckpt, yamls, f"looked for *.yaml in {path} and {path / 'configs'}")
    if path.suffix.lower() in YAML_SUFFIXES:
        raise TokenizerError(f"{path}: this is a config; pass the checkpoint file (or the folder holding both)")
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise TokenizerError(f"{path}: not a checkpoint (expected .ckpt, .pth or .safetensors)")
    folder = path.parent
    yamls = _list(folder, YAML_SUFFIXES)
    where = f"looked for *.yaml in {folder}"
    if not yamls and folder.name == "ckpts":
        yamls = _list(folder.parent / "configs", YAML_SUFFIXES)
        where += f" and {folder.parent / 'configs'}"
    return path, _pick_yaml(path, yamls, where)


# ---------------------------------------------------------------------------------------
# Reading checkpoints
# ---------------------------------------------------------------------------------------

def pickle_refusal(path: Path) -> TokenizerError:
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
    sd = obj
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        sd = obj["state_dict"]
    if not isinstance(sd, dict):
        raise TokenizerError(f"{path}: holds a {type(sd).__name__}, not a state dict (or a dict with 'state_dict')")
    return {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _strip_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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
    sd = _strip_prefix(sd)
    return {k: v for k, v in sd.items()
            if k.startswith(KEPT_PREFIXES) and k not in IGNORED_QUANTIZE_KEYS}


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


def load_taming(path: str | Path, device: str | torch.device = "cpu", trust_pickle: bool = False,
                name: str | None = None) -> TamingVQTokenizer:
    """Load a taming-layout VQGAN (checkpoint + model yaml) as a tokenizer.

    See `find_checkpoint` for the accepted layouts. Only encoder.*, quant_conv.* and the
    quantizer's weights are kept; their keys and shapes must match the yaml's model exactly.
    Weights are cast to float32; `content_hash` is computed over those float32 tensors.
    """
    path = Path(path).expanduser()
    ckpt, cfg_path = find_checkpoint(path)
    params, target = read_config(cfg_path)
    raw = read_state_dict(ckpt, trust_pickle=trust_pickle)
    kept = select_model_keys(raw)
    del raw
    if name is None:
        name = path.name if path.is_dir() else ckpt.stem
    kind = _quantizer_kind(target, set(kept))
    with contextlib.redirect_stdout(io.StringIO()):
        model = TamingVQTokenizer(params, name=name, quantizer=kind)
    expected = model.state_dict()
    check_state_dict(kept, expected, ckpt, cfg_path)
    kept = {k: v.to(torch.float32) for k, v in kept.items()}
    model.load_state_dict(kept, strict=True)
    model.content_hash = hash_state_dict(kept)
    model.source = str(ckpt)
    model.config_path = str(cfg_path)
    return model.to_device(device)
