"""The tokenizer interface every VQ backend implements, and its error type."""
from __future__ import annotations

import abc

import numpy as np
import torch

from cogalign.errors import CogalignError


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
        raise TokenizerError(f"device {device!r}: CUDA is not available here; use --device cpu (or auto)")
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
                                 "drop --precision, --channels-last and --compile")

    def encoder_mode(self) -> dict:
        """The encoder mode for provenance: precision, layout, compile."""
        return {"precision": self.precision, "layout": "channels_last" if self.channels_last else "contiguous",
                "compile": bool(self.compiled)}

    @abc.abstractmethod
    def encode(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """(B, H, W, 3) uint8 with H, W multiples of f -> (B, H//f, W//f) int64 indices.

        Pixels are scaled to [-1, 1] as x / 127.5 - 1 in float32. The batch is encoded as
        given (the caller chooses the batch size)."""

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
        """Validate a (B, H, W, 3) uint8 batch and return it as a uint8 tensor (CPU or device)."""
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8:
                raise TokenizerError(f"{self.name}: encode expects uint8 pixels, got {images.dtype}; convert with arr.astype(np.uint8) after clipping to 0..255")
            arr = np.ascontiguousarray(images)
            if not arr.flags.writeable:  # torch.from_numpy warns on read-only arrays (e.g. from PIL)
                arr = arr.copy()
            t = torch.from_numpy(arr)
        elif isinstance(images, torch.Tensor):
            if images.dtype != torch.uint8:
                raise TokenizerError(f"{self.name}: encode expects uint8 pixels, got {images.dtype}; convert to torch.uint8 after clipping to 0..255")
            t = images
        else:
            raise TokenizerError(f"{self.name}: encode expects a numpy array or torch tensor, got {type(images).__name__}")
        if t.ndim != 4 or t.shape[-1] != 3:
            raise TokenizerError(f"{self.name}: encode expects shape (B, H, W, 3), got {tuple(t.shape)}; stack RGB images into a batch first")
        f = self.downsample
        h, w = int(t.shape[1]), int(t.shape[2])
        if h % f or w % f or h == 0 or w == 0:
            raise TokenizerError(f"{self.name}: image size {h}x{w} is not a positive multiple of f={f}; align region boxes to {f} pixels")
        return t
