"""Taming-transformers VQGAN encoders (and latent-diffusion VQ first stages): model, loading.

Only the encoder path is loaded: taming `Encoder` -> `quant_conv` -> nearest codebook entry
(or, for a Gumbel model, the argmax of `quantize.proj`). The decoder and post_quant_conv are
read from the same checkpoint on the first `decode` (decoder.py); the loss (discriminator,
LPIPS) is ignored.

Only `taming.modules.*` is imported: `taming.models` needs pytorch_lightning and does not
import cleanly.
"""
from __future__ import annotations

import contextlib
import io
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
# Only taming.modules: taming.models needs pytorch_lightning and does not import cleanly.
from taming.modules.diffusionmodules.model import AttnBlock, Encoder

from cogalign.tokenizers.base import PRECISIONS, TokenizerError, VQTokenizer, resolve_device
from cogalign.tokenizers.checkpoints import (apply_attn_type, check_state_dict, find_checkpoint, hash_state_dict, normalize_params,
                                             quantizer_kind, read_config, read_state_dict, select_model_keys)
from cogalign.tokenizers.decoder import decoder_from_files

__all__ = ["TamingVQTokenizer", "load_taming", "nearest_code", "check_fits_memory", "AttnBlockNoSubnormal"]

# Positions per lookup chunk are chosen so that chunk x codebook float32 stays near this
# (4 MB: cache-sized blocks are ~4x faster than one big distance matrix, and never more
# than a few MB is allocated, whatever the batch).
LOOKUP_CHUNK_BYTES = 4 << 20
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_PRECISION_OF = {dtype: name for name, dtype in _DTYPES.items()}
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
    enc = apply_attn_type(Encoder(**ddconfig), ddconfig)
    for m in enc.modules():
        if type(m) is AttnBlock:
            m.__class__ = AttnBlockNoSubnormal
    return enc


def check_fits_memory(params: dict, h: int, w: int, option: str) -> None:
    """Refuse, before any allocation, an image size whose first feature map plus the middle block's
    attention matrix (one float32 per pair of positions) alone exceed this machine's memory."""
    import os

    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return
    dd = params["ddconfig"]
    positions = (h >> (len(dd["ch_mult"]) - 1)) * (w >> (len(dd["ch_mult"]) - 1))
    attention = positions ** 2 * 4 if dd.get("attn_type", "vanilla") != "none" else 0
    need = h * w * (3 + int(dd["ch"])) * 4 + attention
    if need > total:
        raise TokenizerError(f"{option} {h}x{w}: one image needs more than {need / 2**30:.0f} GiB to encode "
                             f"(attention over {positions} positions), this machine has {total / 2**30:.0f} GiB; "
                             f"use a smaller {option}")


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
        self.source: str | None = None  # the checkpoint file and its yaml, set by load_taming
        self.config_path: str | None = None
        self.trust_pickle = False
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
        """A tokenizer is always in eval mode: `train()` leaves it there and returns it."""
        return nn.Module.train(self, False)

    def to_device(self, device: str | torch.device) -> "TamingVQTokenizer":
        """Move the tokenizer to `device` ("auto": CUDA when available, else CPU) and return it;
        the same as `tok.to(device)` with "auto" resolved and a clear error where CUDA is missing."""
        return self.to(resolve_device(device))

    def to(self, *args, **kwargs):
        """nn.Module.to (see `_apply`); a dtype torch itself rejects (torch.int8, ...) is refused
        as a TokenizerError in one line."""
        try:
            return nn.Module.to(self, *args, **kwargs)
        except TypeError as exc:
            raise TokenizerError(f"{self.name}: {' '.join(str(exc).split())}; use tok.to(torch.float32) (the default), "
                                 "tok.to(torch.bfloat16) or, on a GPU, tok.to(torch.float16)") from None

    def to_empty(self, *, device, recurse: bool = True):
        """Refused: it would put uninitialized memory in place of the weights, and the tokenizer
        would encode garbage under its old content_hash."""
        raise TokenizerError(f"{self.name}: to_empty would replace the weights with uninitialized memory; move the "
                             "tokenizer with tok.to(device), or build it there with load_tokenizer(..., device=...)")

    def _apply(self, fn, recurse: bool = True):
        """The hook under `.to()`, `.half()`, `.bfloat16()`, `.float()`, `.cuda()`, `.cpu()`: keeps
        `device` and the encoder mode in step with them. A device change moves the weights and sets
        `device`; a dtype change sets the encoder precision (bfloat16 -> "bf16", float16 -> "fp16",
        float32 -> "fp32") and leaves the weights in float32, exactly as `set_encoder_mode`; a
        memory format sets the layout. The meta device and other dtypes are refused in one line."""
        device, dtype, layout = self._conversion(fn)
        precision = _PRECISION_OF.get(dtype) if dtype is not None else self.precision
        if precision is None:
            raise TokenizerError(f"{self.name}: {dtype} is not an encoder precision; use tok.to(torch.float32) "
                                 "(the default), tok.to(torch.bfloat16) or, on a GPU, tok.to(torch.float16)")
        if device.type == "meta":
            raise TokenizerError(f"{self.name}: a tokenizer cannot move to the meta device (it encodes with its "
                                 "weights); keep it on cpu or cuda, or build it there with load_tokenizer(..., device=...)")
        if precision == "fp16" and device.type == "cpu":
            raise TokenizerError(
                f"{self.name}: float16 is refused on the CPU: PyTorch has no fast CPU kernels for float16 convolutions "
                "(about 30x slower than fp32 here); use tok.to(torch.bfloat16) or tok.float() on the CPU, "
                "float16 on a GPU (tok.to('cuda', torch.float16))")
        if dtype is None:
            nn.Module._apply(self, fn, recurse)  # device, memory format, share_memory: as torch does it
        else:  # the weights stay float32: the dtype is the encoder's autocast precision
            nn.Module._apply(self, lambda t: t.to(device), recurse)
        self.device = device
        self.encoder_batch = 8 if device.type == "cuda" else 1
        decoder = self.__dict__.get("_decoder")
        if decoder is not None:
            decoder.to(device)
        channels_last = self.channels_last if layout is None else layout == "channels_last"
        self.set_encoder_mode(precision, channels_last, self.compiled)
        return self

    def _conversion(self, fn) -> tuple[torch.device, torch.dtype | None, str | None]:
        """What a `_apply` function does, read off two 4-d probe tensors: (device, the dtype it
        converts floats to or None, "channels_last"/"contiguous" or None when it keeps the layout)."""
        try:
            a = fn(torch.zeros((2, 2, 2, 2), dtype=torch.float32, device=self.device))
            b = fn(torch.zeros((2, 2, 2, 2), dtype=torch.float64, device=self.device)
                   .contiguous(memory_format=torch.channels_last))
        except (RuntimeError, AssertionError, TypeError, ValueError) as exc:
            reason = " ".join(str(exc).split())[:160]
            raise TokenizerError(f"{self.name}: cannot move the tokenizer there ({reason}); "
                                 "use cpu, or cuda / cuda:N where CUDA is available") from None
        dtype = None if (a.dtype, b.dtype) == (torch.float32, torch.float64) else a.dtype
        layout = ("channels_last" if not a.is_contiguous() else
                  "contiguous" if b.is_contiguous() else None)
        return a.device, dtype, layout

    def parameter_count(self) -> int:
        """Number of encoder-path parameters (encoder, quant_conv, quantizer)."""
        return sum(p.numel() for p in self.parameters())

    # -- encoding ------------------------------------------------------------------------

    def set_encoder_mode(self, precision: str = "fp32", channels_last: bool = False, compile: bool = False) -> None:
        """See VQTokenizer.set_encoder_mode. `precision` is the autocast dtype of the encoder and
        quant_conv (fp32: no autocast); the codebook lookup always runs in float32.
        `channels_last` keeps the weights and the input in NHWC memory (other kernels, so other
        near-ties). `compile` runs Encoder -> quant_conv through torch.compile (dynamic=False:
        one compilation per crop shape)."""
        if precision not in PRECISIONS:
            raise TokenizerError(f"--precision {precision!r}: choose from {', '.join(PRECISIONS)} "
                                 "(the same names for set_encoder_mode)")
        if precision == "fp16" and self.device.type == "cpu":
            raise TokenizerError(
                "--precision fp16 is refused on the CPU: PyTorch has no fast CPU kernels for float16 convolutions "
                "(about 30x slower than fp32 here); use --precision bf16 or fp32 on the CPU, fp16 on a GPU "
                "(from Python: set_encoder_mode('bf16') or tok.to(torch.bfloat16))")
        self.precision = precision
        self.channels_last = bool(channels_last)
        self.compiled = bool(compile)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        for module in (self.encoder, self.quant_conv):
            nn.Module.to(module, memory_format=fmt)
        self.__dict__.pop("_compiled_pre_quant", None)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_compiled_pre_quant", None)  # compiled code does not pickle; rebuilt on first use
        state.pop("_decoder", None)  # reloaded from `source` on first decode
        return state

    def pre_quant(self, x: torch.Tensor) -> torch.Tensor:
        """Float (B, 3, H, W) in [-1, 1] -> quant_conv output (B, embed_dim, H/f, W/f)."""
        return self.quant_conv(self.encoder(x))

    def _encoder_fn(self):
        if not self.compiled:
            return self.pre_quant
        fn = self.__dict__.get("_compiled_pre_quant")
        if fn is None:
            # inductor imports cpp_extension, which logs "No CUDA runtime is found" on a CPU
            # machine with a CUDA_HOME: not news to a user who compiles for the CPU
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
            fn = torch.compile(self.pre_quant, dynamic=False)
            self.__dict__["_compiled_pre_quant"] = fn
        return fn

    def flops(self, height: int, width: int) -> int:
        """Multiply-adds x 2 of encoding one height x width image (convolutions, attention, lookup),
        counted from the modules' shapes alone: no forward pass."""
        area, last = height * width, len(self.encoder.down) - 1
        total = 0
        for name, m in self.encoder.named_modules():
            parts = name.split(".")  # down.<level>...: that level's size; mid, conv_out: the last level's
            if parts[0] == "down" and len(parts) > 1:
                level = int(parts[1]) + ("downsample" in parts)  # a stride-2 conv: the next level's size
            else:
                level = last if parts[0] in ("mid", "norm_out", "conv_out") else 0
            n = area >> (2 * level)
            if isinstance(m, nn.Conv2d):
                total += 2 * m.in_channels * m.out_channels * m.kernel_size[0] * m.kernel_size[1] * n // m.groups
            elif isinstance(m, AttnBlock):
                total += 4 * n * n * m.in_channels  # q.k and the weighted sum of v
        n = area // self.downsample ** 2
        total += 2 * self.quant_conv.in_channels * self.quant_conv.out_channels * n
        return total + 2 * n * self.codebook_size * self.embed_dim

    def lookup(self, h: torch.Tensor) -> torch.Tensor:
        """quant_conv output (B, C, h, w) -> (B, h, w) int64 code indices."""
        b, c, hh, ww = h.shape
        if self.quantizer == "gumbel":
            return self.quantize.proj(h).argmax(dim=1)
        z = h.permute(0, 2, 3, 1).reshape(-1, c)
        return nearest_code(z, self.quantize.embedding.weight).view(b, hh, ww)

    def encode(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """See VQTokenizer.encode. The indices do not depend on how the caller batches, nor on
        the thread count (spec §7): convolution libraries pick kernels by batch size, memory
        layout and thread count, which moved ~0.1% of indices (near-ties) between a batch of
        4 and 4 batches of 1, or between 1 and 2 threads. So on CUDA the encoder always runs on
        groups of exactly `encoder_batch` images (the last padded with zeros); on CPU each image
        runs alone on one thread, and the images of a batch run side by side on
        `torch.get_num_threads()` threads (as fast as one image on all threads).
        The input is contiguous NCHW, as in taming (a permuted NHWC tensor is channels_last in
        memory and takes other kernels: 0.1-0.2% of indices moved), unless channels_last is set."""
        pixels = self._check_images(images)
        b, h, w, _ = pixels.shape
        f = self.downsample
        out = np.empty((b, h // f, w // f), dtype=np.int64)
        n = max(1, int(self.encoder_batch))
        groups = [(s, min(s + n, b)) for s in range(0, b, n)]
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        dtype = _DTYPES[self.precision]
        encoder = self._encoder_fn()

        def run(group: tuple[int, int]) -> None:
            s, e = group
            with torch.inference_mode(), _no_tf32(self.device):
                x = pixels[s:e].to(self.device, non_blocking=True)
                if e - s < n:
                    x = torch.cat([x, x.new_zeros((n - (e - s),) + tuple(x.shape[1:]))])
                x = (x.permute(0, 3, 1, 2).float() / 127.5 - 1.0).contiguous(memory_format=fmt)
                # autocast is per thread: entered here, in the thread that runs the encoder
                amp = (contextlib.nullcontext() if dtype == torch.float32
                       else torch.autocast(self.device.type, dtype=dtype))
                with amp:
                    pre = encoder(x)
                out[s:e] = self.lookup(pre.float())[:e - s].to("cpu", torch.int64).numpy()

        if self.device.type != "cpu":
            for group in groups:
                run(group)
            return out
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            if threads == 1 or len(groups) == 1 or self.compiled:
                for group in groups:
                    run(group)
            else:
                with ThreadPoolExecutor(min(threads, len(groups))) as pool:
                    list(pool.map(run, groups))
        finally:
            torch.set_num_threads(threads)
        return out

    # -- decoding ------------------------------------------------------------------------

    def decode(self, indices: np.ndarray | torch.Tensor) -> np.ndarray:
        """(B, h, w) or (h, w) code indices -> (B, h*f, w*f, 3) or (h*f, w*f, 3) uint8 RGB.

        The decoder half (post_quant_conv -> taming Decoder, `decoder.VQDecoder`) is read from
        the same checkpoint on the first call and kept, on `device`, in float32 whatever the
        encoder precision. Each grid is decoded on its own, so pixels do not depend on the
        batch. A tokenizer without decoder weights (an encoder-only export, a Gumbel model,
        one built from a config) refuses in one line."""
        decoder = self.__dict__.get("_decoder")
        if decoder is None:
            if not self.source or not self.config_path:
                raise TokenizerError(f"{self.name}: built from a config, not loaded from a checkpoint, so it has no "
                                     "decoder weights; load it with load_tokenizer(NAME or PATH) to decode")
            decoder = decoder_from_files(Path(self.source), Path(self.config_path), trust_pickle=self.trust_pickle,
                                         name=self.name, encoder_hash=self.content_hash).to(self.device)
            self.__dict__["_decoder"] = decoder  # not a submodule: state_dict stays the encoder path
        return decoder.decode(indices)


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
    kind = quantizer_kind(target, set(kept))
    with contextlib.redirect_stdout(io.StringIO()):
        model = TamingVQTokenizer(params, name=name, quantizer=kind)
    expected = model.state_dict()
    check_state_dict(kept, expected, ckpt, cfg_path)
    kept = {k: v.to(torch.float32) for k, v in kept.items()}
    model.load_state_dict(kept, strict=True)
    model.content_hash = hash_state_dict(kept)
    model.source = str(ckpt)
    model.config_path = str(cfg_path)
    model.trust_pickle = bool(trust_pickle)
    return model.to_device(device)
