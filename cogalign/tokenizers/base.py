"""The tokenizer interface every VQ backend implements, and its error type."""
from __future__ import annotations

import abc

import numpy as np
import torch

from cogalign.errors import CogalignError


__all__ = ["PRECISIONS", "RESUME_STATES", "TokenizerError", "VQTokenizer", "resolve_device", "pixel_problem"]

# `vq train`'s resume state (and its partial write): never a model checkpoint, never pushed
RESUME_STATES = ("train_state.pt", "train_state.pt.tmp")

# Encoder precisions (`--precision`): the name and its torch dtype. The codebook distance is
# always computed in float32.
PRECISIONS = ("fp32", "bf16", "fp16")


class TokenizerError(CogalignError):
    """A tokenizer cannot be found, loaded or used. The message is one line that names
    the file (or preset) and the fix."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`"auto"` means CUDA when available, else CPU; anything else goes to torch.device."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise TokenizerError(f"device {device!r}: not a torch device ({exc}); use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TokenizerError(f"device {device!r}: CUDA is not available here; use --device cpu or auto (device='cpu' from Python)")
    return dev


class VQTokenizer(abc.ABC):
    """Maps RGB images to grids of codebook indices.

    Attributes every implementation sets:
      name          e.g. "demo-f8-4096", or the checkpoint's folder / file stem
      content_hash  sha256 hex[:16] of the weights actually used (stable across runs and machines)
      codebook_size number of codes (indices are in [0, codebook_size))
      downsample    f: one index per f×f pixel block
      device        where encode runs
    """

    name: str
    content_hash: str
    codebook_size: int
    downsample: int
    device: torch.device

    precision: str = "fp32"
    channels_last: bool = False
    compiled: bool = False

    def set_encoder_mode(self, precision: str = "fp32", channels_last: bool = False, compile: bool = False) -> None:
        """How the encoder runs (precision, memory layout, torch.compile). Indices may differ from
        the default (fp32, contiguous, eager), so the mode is part of the provenance. A backend
        that has only the default refuses the others."""
        if (precision, channels_last, compile) != ("fp32", False, False):
            raise TokenizerError(f"{self.name}: this tokenizer runs only in fp32, contiguous, eager; "
                                 "drop --precision, --channels-last and --compile (from Python: call set_encoder_mode() with no arguments)")

    def encoder_mode(self) -> dict:
        """The encoder mode for provenance: precision, layout, compile."""
        return {"precision": self.precision, "layout": "channels_last" if self.channels_last else "contiguous",
                "compile": bool(self.compiled)}

    @abc.abstractmethod
    def encode(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """(B, H, W, 3) uint8 with H, W multiples of f -> (B, H//f, W//f) int64 indices.

        Pixels are scaled to [-1, 1] as x / 127.5 - 1 in float32. The batch is encoded as
        given (the caller chooses the batch size)."""

    def decode(self, indices: np.ndarray | torch.Tensor) -> np.ndarray:
        """(B, h, w) or (h, w) code indices -> (B, h*f, w*f, 3) or (h*f, w*f, 3) uint8 RGB, with the
        decoder half of the same model. A backend without a decoder refuses in one line."""
        raise TokenizerError(f"{self.name}: this tokenizer has no decoder; decode with a taming tokenizer "
                             "loaded from a full checkpoint (load_tokenizer)")

    def index_length(self, height: int, width: int) -> int:
        """Number of indices for a height×width region: (height//f) * (width//f)."""
        f = self.downsample
        return (int(height) // f) * (int(width) // f)

    def describe(self) -> dict:
        """Name, hash and geometry, for provenance metadata."""
        return {
            "name": self.name,
            "content_hash": self.content_hash,
            "codebook_size": int(self.codebook_size),
            "downsample": int(self.downsample),
            **self.encoder_mode(),
        }

    # -- helpers for implementations -------------------------------------------------

    def _check_images(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Validate a (B, H, W, 3) uint8 batch and return it as a uint8 tensor (CPU or device).
        Anything else is refused in one line that names what is wrong (layout, channels, dtype,
        value range) and an expression that converts it."""
        if isinstance(images, np.ndarray):
            t = None
        elif isinstance(images, torch.Tensor):
            t = images
        else:
            if type(images).__module__.startswith("PIL"):
                hint = "np.asarray(image.convert('RGB'))[None]"
            elif isinstance(images, (list, tuple)):
                hint = "np.stack(images) (each (H, W, 3) uint8; a PIL image: np.asarray(im.convert('RGB')))"
            else:
                hint = "np.asarray(...) of shape (B, H, W, 3), dtype uint8"
            raise TokenizerError(f"{self.name}: encode expects a numpy array or torch tensor (B, H, W, 3) uint8, "
                                 f"got {type(images).__name__}; convert with {hint}")
        problem = pixel_problem(images)
        if problem:
            raise TokenizerError(f"{self.name}: encode expects a (B, H, W, 3) uint8 batch (RGB 0..255, channels last); "
                                 f"{problem}")
        if t is None:
            arr = np.ascontiguousarray(images)
            if not arr.flags.writeable:  # torch.from_numpy warns on read-only arrays (e.g. from PIL)
                arr = arr.copy()
            t = torch.from_numpy(arr)
        f = self.downsample
        h, w = int(t.shape[1]), int(t.shape[2])
        if h % f or w % f or h == 0 or w == 0:
            raise TokenizerError(f"{self.name}: image size {h}x{w} is not a positive multiple of f={f}; "
                                 f"crop or resize to multiples of {f} pixels (align region boxes to {f})")
        return t


def pixel_problem(x: np.ndarray | torch.Tensor) -> str | None:
    """None for a (B, H, W, 3) uint8 batch; otherwise what is wrong with `x` (layout, channels,
    dtype, value range) and an expression, in numpy or torch terms as `x` is, that converts it:
    e.g. "got (2, 3, 64, 64) float32 in [0, 1]: channels first, floats in [0, 1]; convert with
    (x.transpose(0, 2, 3, 1) * 255).round().clip(0, 255).astype(np.uint8)"."""
    is_torch = isinstance(x, torch.Tensor)
    shape = tuple(int(n) for n in x.shape)
    uint8 = x.dtype == (torch.uint8 if is_torch else np.uint8)
    if uint8 and len(shape) == 4 and shape[-1] == 3:
        return None
    problems: list[str] = []
    expr = "x"
    chw = "x.permute(0, 2, 3, 1)" if is_torch else "x.transpose(0, 2, 3, 1)"

    def grey(e: str) -> str:  # (..., 1) -> (..., 3)
        return f"{e}.repeat_interleave(3, dim=-1)" if is_torch else f"np.repeat({e}, 3, axis=-1)"

    n = len(shape)
    if n == 4 and shape[-1] == 3:
        pass
    elif n == 4 and shape[-1] == 4:
        problems.append("4 channels (RGBA?): drop alpha (or use PIL's im.convert('RGB'))")
        expr = "x[..., :3]"
    elif n == 4 and shape[-1] == 1:
        problems.append("1 channel (grey): repeat it to RGB (or use PIL's im.convert('RGB'))")
        expr = grey("x")
    elif n == 4 and shape[1] in (1, 3, 4):
        problems.append(f"channels first (B, {shape[1]}, H, W): put them last")
        expr = {3: chw, 4: chw + "[..., :3]", 1: grey(chw)}[shape[1]]
    elif n == 3 and shape[-1] == 3:
        problems.append("one image (H, W, 3) without the batch axis")
        expr = "x[None]"
    elif n == 3 and shape[0] == 3 and shape[-1] != 3:
        problems.append("one channels-first image (3, H, W): put the channels last and add the batch axis")
        expr = "x.permute(1, 2, 0)[None]" if is_torch else "x.transpose(1, 2, 0)[None]"
    elif n == 3 and shape[-1] == 4:
        problems.append("one RGBA image (H, W, 4): drop alpha and add the batch axis")
        expr = "x[None, ..., :3]"
    elif n == 3:
        problems.append("no channel axis (a batch of grey images (B, H, W)?): repeat to RGB (or use PIL's im.convert('RGB'))")
        expr = grey("x[..., None]")
    elif n == 2:
        problems.append("one grey image (H, W): add the batch and channel axes")
        expr = grey("x[None, ..., None]")
    else:
        return (f"got shape {shape}; stack RGB images of shape (H, W, 3) into a batch, e.g. "
                "np.stack([np.asarray(im.convert('RGB')) for im in images])")
    if not uint8:
        problems_dtype, expr = _dtype_fix(x, expr, is_torch)
        if problems_dtype is None:
            return f"got {shape} {x.dtype}; encode takes uint8 pixels (0..255) only"
        problems.append(problems_dtype)
    return f"got {shape} {x.dtype}: {'; '.join(problems)}; convert with {expr}"


def _dtype_fix(x: np.ndarray | torch.Tensor, expr: str, is_torch: bool) -> tuple[str | None, str]:
    """(what is wrong with the dtype / value range, `expr` wrapped to make uint8 0..255)."""
    to_u8 = ".to(torch.uint8)" if is_torch else ".astype(np.uint8)"
    clip = ".clamp(0, 255)" if is_torch else ".clip(0, 255)"
    floating = x.is_floating_point() if is_torch else x.dtype.kind == "f"
    integer = (not floating and x.dtype != torch.bool and not x.is_complex()) if is_torch else x.dtype.kind in "iu"
    if not (floating or integer):
        return None, expr
    if floating and bool(x.isnan().any() if is_torch else np.isnan(x).any()):
        return "floats with NaN values: replace them first (np.nan_to_num / torch.nan_to_num)", f"{expr}{to_u8} after that"
    lo, hi = (float(x.min()), float(x.max())) if (x.numel() if is_torch else x.size) else (0.0, 0.0)
    if floating:
        if 0 <= lo and hi <= 1:
            return f"floats in [{lo:.3g}, {hi:.3g}] (scale 0..1 to 0..255)", f"({expr} * 255).round(){clip}{to_u8}"
        if -1 <= lo and hi <= 1:
            return (f"floats in [{lo:.3g}, {hi:.3g}] (scale -1..1 to 0..255)",
                    f"(({expr} + 1) * 127.5).round(){clip}{to_u8}")
        if 0 <= lo and hi <= 255:
            return f"floats in [{lo:.3g}, {hi:.3g}] (already 0..255: round them)", f"{expr}.round(){clip}{to_u8}"
        return f"floats in [{lo:.3g}, {hi:.3g}], outside 0..255: rescale them to 0..255", f"{expr}.round(){to_u8} after rescaling"
    if integer:
        if 0 <= lo and hi <= 255:
            return f"integers in 0..255 stored as {x.dtype}", f"{expr}{to_u8}"
        if 0 <= lo and hi <= 65535:
            return f"integers up to {hi:.0f} (16-bit?): scale 0..65535 to 0..255", f"({expr} // 257){to_u8}"
        return f"integers in [{lo:.0f}, {hi:.0f}], outside 0..255: rescale them to 0..255", f"{expr}{to_u8} after rescaling"
    return None, expr
