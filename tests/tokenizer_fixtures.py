"""Shared helpers for the tokenizer tests: small random taming models written in the
layouts users have (Lightning .ckpt, .pth, .safetensors), reference indices computed with
taming's own modules, and real photos from examples/images."""
from __future__ import annotations

import contextlib
import copy
import io
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_IMAGES = REPO / "examples" / "images"

# ch=32, f=8, an attention block at 16x16 (resolution 64: levels 64, 32, 16, 8).
TINY_DDCONFIG = {
    "double_z": False, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3,
    "ch": 32, "ch_mult": [1, 2, 2, 4], "num_res_blocks": 1, "attn_resolutions": [16], "dropout": 0.0,
}
TINY_PARAMS = {"embed_dim": 4, "n_embed": 512, "ddconfig": TINY_DDCONFIG}


def taming_yaml(params: dict = TINY_PARAMS, target: str = "taming.models.vqgan.VQModel", bare: bool = False) -> str:
    p = copy.deepcopy(params)
    if bare:
        return yaml.safe_dump(p, sort_keys=False)
    p["lossconfig"] = {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                       "params": {"disc_conditional": False, "disc_in_channels": 3, "disc_start": 10000}}
    return yaml.safe_dump({"model": {"base_learning_rate": 4.5e-6, "target": target, "params": p}}, sort_keys=False)


def lightning_yaml() -> str:
    """The second yaml taming writes into configs/: trainer settings, no model."""
    return yaml.safe_dump({"lightning": {"trainer": {"benchmark": True, "accumulate_grad_batches": 2}}})


def photos(size: tuple[int, int], names: list[str] | None = None) -> np.ndarray:
    """The example photos (all 13 unless `names`) stretched to size=(width, height): (B, H, W, 3) uint8."""
    paths = sorted(EXAMPLE_IMAGES.iterdir()) if names is None else [EXAMPLE_IMAGES / n for n in names]
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(np.asarray(im.convert("RGB").resize(size, Image.BICUBIC), dtype=np.uint8))
    return np.stack(out)


def make_random_taming_state(params: dict = TINY_PARAMS, seed: int = 0, gumbel: bool = False) -> dict[str, torch.Tensor]:
    """A full taming VQModel state dict (encoder, decoder, quant_conv, post_quant_conv,
    quantizer, loss.*) with random weights; the codebook is drawn from a Gaussian fitted to
    the encoder's outputs on the photos, so that codes are spread where the data is."""
    from taming.modules.diffusionmodules.model import Decoder, Encoder

    torch.manual_seed(seed)
    dd = params["ddconfig"]
    with contextlib.redirect_stdout(io.StringIO()):
        enc, dec = Encoder(**dd), Decoder(**dd)
    qc = nn.Conv2d(dd["z_channels"], params["embed_dim"], 1)
    pqc = nn.Conv2d(params["embed_dim"], dd["z_channels"], 1)
    with torch.no_grad():
        x = torch.from_numpy(photos((64, 64))).permute(0, 3, 1, 2).float() / 127.5 - 1
        z = qc(enc(x)).permute(0, 2, 3, 1).reshape(-1, params["embed_dim"])
    mean, std = z.mean(0), z.std(0)
    sd: dict[str, torch.Tensor] = {}
    sd.update({"encoder." + k: v for k, v in enc.state_dict().items()})
    sd.update({"decoder." + k: v for k, v in dec.state_dict().items()})
    sd.update({"quant_conv." + k: v for k, v in qc.state_dict().items()})
    sd.update({"post_quant_conv." + k: v for k, v in pqc.state_dict().items()})
    n = params["n_embed"]
    if gumbel:
        proj = nn.Conv2d(dd["z_channels"], n, 1)
        sd.update({"quantize.proj." + k: v for k, v in proj.state_dict().items()})
        sd["quantize.embed.weight"] = torch.randn(n, params["embed_dim"])
    else:
        sd["quantize.embedding.weight"] = mean + std * torch.randn(n, params["embed_dim"])
    sd["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)
    sd["loss.perceptual_loss.scaling_layer.shift"] = torch.randn(1, 3, 1, 1)
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def lightning_checkpoint(sd: dict[str, torch.Tensor], extra: dict | None = None) -> dict:
    ck = {"state_dict": sd, "global_step": 0, "epoch": 0, "pytorch-lightning_version": "1.0.8"}
    ck.update(extra or {})
    return ck


def reference_indices(sd: dict[str, torch.Tensor], params: dict, images: np.ndarray) -> np.ndarray:
    """Indices from taming's own modules: Encoder -> quant_conv -> VectorQuantizer, float32."""
    from taming.modules.diffusionmodules.model import Encoder
    from taming.modules.vqvae.quantize import VectorQuantizer

    dd = params["ddconfig"]
    enc = Encoder(**dd)
    enc.load_state_dict({k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")})
    qc = nn.Conv2d(dd["z_channels"], params["embed_dim"], 1)
    qc.load_state_dict({k[len("quant_conv."):]: v for k, v in sd.items() if k.startswith("quant_conv.")})
    vq = VectorQuantizer(params["n_embed"], params["embed_dim"], beta=0.25)
    vq.embedding.weight.data.copy_(sd["quantize.embedding.weight"])
    enc.eval(), qc.eval(), vq.eval()
    with torch.no_grad():
        # contiguous NCHW, as taming's own data pipeline gives it (a bare permute of NHWC
        # pixels is channels_last in memory, which takes other convolution kernels)
        x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0).contiguous()
        h = qc(enc(x))
        _, _, (_, _, idx) = vq(h)
    b, _, hh, ww = h.shape
    return idx.view(b, hh, ww).numpy()


class FakeLightningCallback:
    """Pickled under a module name that does not exist here, like a Lightning callback
    when pytorch_lightning is not installed."""

    def __init__(self):
        self.monitor = "val/rec_loss"
        self.best = torch.tensor(0.5)


def save_with_unimportable_object(obj: dict, path: Path) -> None:
    """torch.save `obj` with a FakeLightningCallback recorded as fake_lightning.callbacks.ModelCheckpoint."""
    mod = types.ModuleType("fake_lightning.callbacks")
    cls = type("ModelCheckpoint", (FakeLightningCallback,), {"__module__": "fake_lightning.callbacks"})
    mod.ModelCheckpoint = cls
    pkg = types.ModuleType("fake_lightning")
    pkg.callbacks = mod
    sys.modules["fake_lightning"], sys.modules["fake_lightning.callbacks"] = pkg, mod
    try:
        obj = dict(obj)
        obj["callbacks"] = {"ModelCheckpoint": cls()}
        torch.save(obj, path)
    finally:
        del sys.modules["fake_lightning"], sys.modules["fake_lightning.callbacks"]
