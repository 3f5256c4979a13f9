"""taming's VQGAN losses (`VQLPIPSWithDiscriminator`), rebuilt from its parts without
importing `taming.modules.losses` (which needs `requests` and downloads VGG at first use):

generator: mean(|x - rec| + perceptual_weight * LPIPS(x, rec)) [+ mse_weight * MSE]
           + adaptive_weight * disc_factor * (-mean(D(rec))) + codebook_weight * commitment
discriminator (from --disc-start on): hinge, 0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(rec))))

D is taming's PatchGAN `NLayerDiscriminator` with its `weights_init`. The adaptive weight
is taming's: |grad nll| / (|grad g| + 1e-4) on the decoder's last layer, clamped to
[0, 1e4], times disc_weight."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from cogalign.tokenizers.base import TokenizerError

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's file name for the ImageNet VGG16 weights
LPIPS_ENV = "COGALIGN_LPIPS_VGG"


def find_vgg_weights(path: str | Path | None = None) -> Path | None:
    """The VGG16 weights for LPIPS: `path`, else $COGALIGN_LPIPS_VGG, else torchvision's
    cache ($TORCH_HOME/hub/checkpoints/vgg16-397923af.pth). A path given but missing is an error."""
    given = path or os.environ.get(LPIPS_ENV)
    if given:
        p = Path(given).expanduser()
        if not p.is_file():
            src = "--lpips-vgg" if path else f"${LPIPS_ENV}"
            raise TokenizerError(f"{src} {p}: no such file; give torchvision's {VGG16_FILE} (the ImageNet VGG16 state dict)")
        return p
    cached = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE
    return cached if cached.is_file() else None


@contextlib.contextmanager
def _no_random_init():
    """Skip torch.nn.init's random fills while LPIPS is built: its VGG16 trunk is then read from
    the file and its heads from the lpips package, and drawing ~138M random numbers for a
    torchvision vgg16 (classifier included, then dropped) took ~4.5 s."""
    names = ("kaiming_uniform_", "kaiming_normal_", "uniform_", "normal_", "constant_", "xavier_uniform_")
    saved = {n: getattr(nn.init, n) for n in names}
    for n in names:
        setattr(nn.init, n, lambda tensor, *a, **k: tensor)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


def load_lpips(vgg_weights: Path) -> nn.Module:
    """The `lpips` package's VGG LPIPS (its shipped linear heads), with the VGG16 trunk
    read from a local torchvision state dict instead of downloaded. Frozen, eval mode."""
    try:
        import lpips
    except ImportError as e:
        raise TokenizerError(f"the perceptual loss needs the lpips package ({e}); pip install lpips") from None
    sd = torch.load(str(vgg_weights), map_location="cpu", weights_only=True)
    if not isinstance(sd, dict) or not any(str(k).startswith("features.") for k in sd):
        raise TokenizerError(f"{vgg_weights}: not torchvision's VGG16 state dict (no features.* keys)")
    import warnings

    with warnings.catch_warnings(), _no_random_init():
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    trunk = model.net  # slices of torchvision's vgg16().features, each layer named by its index there
    for k in range(1, trunk.N_slices + 1):
        for name, layer in getattr(trunk, f"slice{k}").named_children():
            prefix = f"features.{name}."
            try:
                layer.load_state_dict({key[len(prefix):]: v for key, v in sd.items() if key.startswith(prefix)})
            except RuntimeError as e:
                raise TokenizerError(f"{vgg_weights}: not torchvision's VGG16 state dict ({str(e).splitlines()[0]})") from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def make_discriminator(layers: int) -> nn.Module:
    from taming.modules.discriminator.model import NLayerDiscriminator, weights_init

    return NLayerDiscriminator(input_nc=3, n_layers=layers, use_actnorm=False).apply(weights_init)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, disc_weight: float) -> torch.Tensor:
    nll_grads = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
    return torch.clamp(w, 0.0, 1e4).detach() * disc_weight


class VQGANLoss(nn.Module):
    def __init__(self, disc_weight: float, perceptual_weight: float, mse_weight: float, disc_layers: int,
                 disc_start: int, codebook_weight: float = 1.0, lpips: nn.Module | None = None):
        super().__init__()
        self.disc_weight, self.mse_weight, self.disc_start = disc_weight, mse_weight, disc_start
        self.codebook_weight = codebook_weight
        self.perceptual_weight = perceptual_weight if lpips is not None else 0.0
        self.lpips = lpips
        self.discriminator = make_discriminator(disc_layers) if disc_weight > 0 else None

    def gan_on(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.disc_start

    def generator(self, x, rec, vq_loss, step: int, last_layer, disc=None) -> tuple[torch.Tensor, dict]:
        """The autoencoder's loss. `disc`: the discriminator to call (its frozen view)."""
        rec_loss = (x - rec).abs()
        logs = {"l1": rec_loss.mean().detach()}
        if self.perceptual_weight > 0:
            p = self.lpips(x.float(), rec.float())
            rec_loss = rec_loss + self.perceptual_weight * p
            logs["lpips"] = p.mean().detach()
        nll = rec_loss.mean()
        if self.mse_weight > 0:
            nll = nll + self.mse_weight * F.mse_loss(rec, x)
        loss = nll + self.codebook_weight * vq_loss
        if self.gan_on(step):
            g_loss = -(disc if disc is not None else self.discriminator)(rec).mean()
            w = adaptive_weight(nll, g_loss, last_layer, self.disc_weight)
            loss = loss + w * g_loss
            logs.update(g_loss=g_loss.detach(), d_weight=w)
        return loss, logs

    def discriminator_loss(self, x, rec, disc=None) -> torch.Tensor:
        d = disc if disc is not None else self.discriminator
        return hinge_d_loss(d(x.detach()), d(rec.detach()))
