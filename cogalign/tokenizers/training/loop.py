"""The `vq train` loop: k-means codebook init, the autoencoder and discriminator steps
(taming's alternation), the EMA codebook kept identical across torchrun ranks, bf16
autocast on GPUs, resume, progress, and the export."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from cogalign.expand.distributed import from_env, init_process_group
from cogalign.expand.progress import Progress
import cogalign.tokenizers.training.state as st
from cogalign.tokenizers.base import TokenizerError
from cogalign.tokenizers.training.config import TrainConfig
from cogalign.tokenizers.training.data import CropBatches, collect_images, to_model_input
from cogalign.tokenizers.training.export import METRICS_FILE, export_taming
from cogalign.tokenizers.training.losses import VQGANLoss, find_vgg_weights, load_lpips
from cogalign.tokenizers.training.model import PRESETS, VQAutoencoder, make_ddconfig


class StepProgress(Progress):
    """cogalign's progress bar, showing loss, PSNR and codebook use instead of record rates."""

    def __init__(self, total: int, start: int, enabled: bool):
        super().__init__(total, enabled, label="steps")
        self.done = start
        self.first, self.text = start, ""

    def rates(self) -> str:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        return f"{(self.done - self.first) / elapsed:.2f} step/s {self.text}"

    def step(self, text: str) -> None:
        self.text = text
        self.done += 1
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, rates=self.rates())


def sync_codebook(model: VQAutoencoder, world: int) -> None:
    """Average the EMA statistics over ranks and rebuild the codebook from them, so every
    rank holds the same codebook (one all_reduce per step on every rank: no rank-dependent
    collectives that could hang)."""
    if world <= 1:
        return
    cb = model.vq._codebook
    flat = torch.cat([cb.embed_avg.flatten(), cb.cluster_size.flatten()])
    dist.all_reduce(flat)
    flat /= world
    n = cb.embed_avg.numel()
    cb.embed_avg.copy_(flat[:n].view_as(cb.embed_avg))
    cb.cluster_size.copy_(flat[n:].view_as(cb.cluster_size))
    cb.update_ema()


def average_grads(module: torch.nn.Module, world: int) -> None:
    """All-reduce the discriminator's gradients by hand: it runs twice (real, fake) per
    backward, which DDP's reducer does not allow."""
    if world <= 1:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    for g, v in zip(grads, torch.split(flat, [g.numel() for g in grads])):
        g.copy_(v.view_as(g))


def _kmeans_init(model: VQAutoencoder, batches: CropBatches, dev, world: int, latents: int | None) -> None:
    """k-means on `latents` (default 2 per code) latents of the start encoder; the same
    crops (and torch seed) on every rank, then rank 0's codebook is broadcast anyway."""
    f, c = model.downsample, batches.crop
    n = max(1, math.ceil((latents or 2 * model.codes) / (c // f) ** 2))
    with torch.no_grad():
        crops = batches.init_crops(n)
        hs = [model.pre_quant(to_model_input(crops[s:s + 64]).to(dev)) for s in range(0, n, 64)]
        model.quantize(torch.cat(hs))
    if world > 1:
        for b in model.codebook_buffers():
            dist.broadcast(b, 0)


def _lr_at(cfg: TrainConfig, step: int) -> float:
    warm = PRESETS[cfg.preset].warmup
    return cfg.lr * min(1.0, (step + 1) / warm) if warm else cfg.lr


def train_vq(image_paths: Iterable[str | Path], out_dir: str | Path, *, resume: bool = False, force: bool = False,
             image_root: str | Path | None = None, allow_absolute: bool = False, progress: bool = True,
             log: Callable[[str], None] | None = print, **settings) -> dict:
    """Train a VQGAN on random crops of the images, export it to out_dir (taming layout) and
    return the metrics (also in out_dir/train_metrics.json). `settings`: TrainConfig fields.
    Under torchrun, every rank calls this; rank 0 writes."""
    work = from_env()
    log = log if log and work.is_main else (lambda s: None)  # rank 0 speaks for all
    cfg = TrainConfig(**settings).resolved(work.world_size)
    cfg.check()
    out = Path(out_dir)
    if work.is_main:
        st.prepare_out(out, force, resume)
    init_process_group(work)
    world, rank = work.world_size, work.rank
    t_start = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if cfg.device == "auto":
        dev = torch.device(f"cuda:{work.local_rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(cfg.device if world == 1 or cfg.device != "cuda" else f"cuda:{work.local_rank}")
    images = collect_images(image_paths, image_root, allow_absolute)
    names = [r.name for r in images.refs]
    if images.skipped:
        log(f"vq train: {sum(images.skipped.values())} records gave no image "
            f"({', '.join(f'{k}: {v}' for k, v in sorted(images.skipped.items()))})")
    batches = CropBatches(images.refs, cfg.crop, cfg.batch_size, cfg.seed, rank)
    batches.image(0)  # one decodable image, before the model is built (else one line naming the first failure)
    f = cfg.downsample
    threshold = cfg.dead_code_threshold
    if threshold is None:
        threshold = min(2.0, 0.05 * cfg.batch_size * (cfg.crop // f) ** 2 / cfg.codes)
    dd = make_ddconfig(cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.z_channels, cfg.attn_resolutions)
    model = VQAutoencoder(dd, cfg.codes, cfg.embed_dim, decay=cfg.ema_decay, dead_code_threshold=threshold,
                          commitment_weight=cfg.commitment_weight).to(dev)
    lpips, vgg = None, None
    if cfg.perceptual_weight > 0:
        vgg = find_vgg_weights(cfg.lpips_vgg)
        if vgg is not None:
            lpips = load_lpips(vgg).to(dev)
    skipped = losses_skipped(cfg, lpips is not None)
    for line in skipped:
        log(f"vq train: NOTE: {line}")
    loss_fn = VQGANLoss(cfg.disc_weight, cfg.perceptual_weight, PRESETS[cfg.preset].mse_weight, PRESETS[cfg.preset].disc_layers,
                        cfg.disc_start, cfg.codebook_weight, lpips).to(dev)
    disc = loss_fn.discriminator
    betas = PRESETS[cfg.preset].betas
    ae_params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(ae_params, lr=cfg.lr, betas=betas)
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=betas) if disc is not None else None
    digest = st.images_digest(names)
    start, hist = 0, {"step": [], "loss": [], "psnr_db": [], "codes_used": []}
    ema_mse, used = None, torch.zeros(cfg.codes, dtype=torch.bool)
    loss_id = st.loss_identity(cfg, vgg if lpips is not None else None)
    if resume:
        saved = st.load_state(out, cfg.as_dict(), digest, loss_id)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        if disc is not None:
            disc.load_state_dict(saved["disc"])
            opt_d.load_state_dict(saved["opt_d"])
        rngs = saved["rng"]  # one per rank
        torch.set_rng_state(rngs[rank] if len(rngs) == world else rngs[0])
        start, hist = saved["step"], saved["history"]
        if hist["step"] and hist["step"][-1] % saved["config"].get("log_every", cfg.log_every):
            for values in hist.values():  # the stopped run's closing line: an uninterrupted run has none there
                values.pop()
        ema_mse = saved.get("ema_mse")  # the moving train PSNR and the codes seen since the last log line
        if "codes_seen" in saved:
            used = saved["codes_seen"].clone()
    else:
        model.train()
        _kmeans_init(model, batches, dev, world, cfg.kmeans_latents)
    ddp_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [dev.index] if dev.type == "cuda" else None
        # The EMA codebook buffers are kept equal by sync_codebook, not by DDP. torch 2.14 deprecates
        # broadcast_buffers (a FutureWarning per rank), but its successor forward_sync_buffers=False
        # still syncs buffers at init, which the warning itself says to avoid for such buffers.
        import warnings

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*broadcast_buffers", category=FutureWarning)
            ddp_model = DDP(model, device_ids=ids, broadcast_buffers=False)
    n_params = sum(p.numel() for p in model.parameters())
    n_codebook = model.vq._codebook.embed.numel()  # an EMA buffer, not a parameter (`vq info` counts it)
    log(f"vq train: preset {cfg.preset}, {len(names)} images, {cfg.codes} codes, f={f}, {n_params:,} trainable "
        f"parameters + {n_codebook:,} codebook values (EMA), "
        f"steps {start}..{cfg.steps} of {cfg.batch_size}x{cfg.crop}^2 crops x {world} rank(s), lr {cfg.lr:.3g}, "
        f"GAN {'from step ' + str(cfg.disc_start) if disc is not None and cfg.disc_start < cfg.steps else 'off'}, "
        f"LPIPS {'on' if lpips is not None else 'off'}, device {dev}")
    loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=cfg.workers,
                                         sampler=range(start, cfg.steps))
    autocast = dev.type == "cuda" and cfg.bf16
    clip = 1.0 if PRESETS[cfg.preset].mse_weight > 0 else None  # the demo recipe clips; taming does not
    model.train()
    saved_step = start or None  # the step of the resume state on disk, if any
    t_loop = time.perf_counter()
    with StepProgress(cfg.steps, start, progress and work.is_main) as bar:
        for step, crops in enumerate(loader, start):
            for g in opt.param_groups:
                g["lr"] = _lr_at(cfg, step)
            x = to_model_input(crops.numpy()).to(dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                rec, idx, vq_loss = ddp_model(x)
                if disc is not None:
                    disc.requires_grad_(False)
                loss, logs = loss_fn.generator(x, rec, vq_loss, step, model.last_layer(), disc)
            _stop_if_diverged(loss, step, saved_step, cfg, out, world)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(ae_params, clip)
            opt.step()
            with torch.no_grad():
                sync_codebook(model, world)
            if loss_fn.gan_on(step):
                disc.requires_grad_(True)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                    d_loss = loss_fn.discriminator_loss(x, rec)
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                average_grads(disc, world)
                opt_d.step()
            mse = float(torch.mean((rec.detach().float() - x) ** 2))
            ema_mse = mse if ema_mse is None else 0.98 * ema_mse + 0.02 * mse
            psnr = 10 * math.log10(4.0 / max(ema_mse, 1e-12))  # x in [-1, 1]: PSNR over 0..255
            used[idx.flatten().cpu()] = True
            bar.step(f"loss {loss.item():.4f} psnr {psnr:.2f} dB codes {int(used.sum())}/{cfg.codes}")
            done = step + 1
            on_grid = step % cfg.log_every == 0
            if on_grid or done == cfg.steps:
                for k, v in (("step", step), ("loss", round(loss.item(), 5)), ("psnr_db", round(psnr, 3)),
                             ("codes_used", int(used.sum()))):
                    hist[k].append(v)
                if not bar._tty:
                    log(f"step {step:6d}  {bar.text}  lr {_lr_at(cfg, step):.2e}  {time.perf_counter() - t_start:.0f}s")
                if on_grid:  # the last line of a run off the grid keeps counting, so a resume goes on as one run
                    used.zero_()
            if done % cfg.save_every == 0 or done == cfg.steps:
                rngs = [torch.get_rng_state()] * world
                if world > 1:  # every rank's RNG (dead-code re-seeding draws from it)
                    dist.all_gather_object(rngs, torch.get_rng_state())
                saved_step = done
                if work.is_main:
                    st.save_state(out, {
                        "step": done, "config": cfg.as_dict(), "images_digest": digest, "images": len(names),
                        "model": model.state_dict(), "opt": opt.state_dict(), "rng": rngs,
                        "disc": disc.state_dict() if disc is not None else {},
                        "opt_d": opt_d.state_dict() if disc is not None else {}, "history": hist,
                        "loss_identity": loss_id, "ema_mse": ema_mse, "codes_seen": used.clone()})
    if batches.bad:
        log(f"vq train: {len(batches.bad)} images could not be decoded and were skipped, e.g. {next(iter(batches.bad.values()))}")
    model.eval()
    seconds = time.perf_counter() - t_start
    metrics = {**cfg.as_dict(), "images": len(names), "images_skipped": dict(images.skipped),
               "images_undecodable": sorted(batches.bad), "downsample": f, "dead_code_threshold": threshold,
               "world_size": world, "rank": rank, "parameters": n_params, "lpips": lpips is not None,
               "lpips_vgg_sha256": loss_id["lpips_vgg_sha256"], "mse_weight": PRESETS[cfg.preset].mse_weight,
               "disc_layers": PRESETS[cfg.preset].disc_layers,
               "gan_steps": max(0, cfg.steps - cfg.disc_start) if disc is not None else 0,
               "losses_skipped": skipped,
               "train_seconds": round(seconds, 1), "steps_this_run": cfg.steps - start,
               "seconds_per_step": round((time.perf_counter() - t_loop) / max(1, cfg.steps - start), 3),
               "final_train_psnr_db": 10 * math.log10(4.0 / max(ema_mse or 1e-12, 1e-12)),
               "history_every": cfg.log_every, "history": hist, "torch": torch.__version__}
    if work.is_main:
        ddtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[cfg.decoder_dtype]
        export_taming(model.to("cpu"), out, decoder_dtype=ddtype, metadata={
            "producer": "cogalign vq train", "preset": cfg.preset, "steps": cfg.steps, "codes": cfg.codes, "seed": cfg.seed})
        write_metrics(out, metrics)
        log(f"vq train: wrote {out / 'model.safetensors'} and {out / 'config.yaml'} "
            f"({cfg.steps - start} steps in {seconds:.0f}s, train PSNR ~{metrics['final_train_psnr_db']:.2f} dB)")
    metrics["model"] = model
    return metrics


def _stop_if_diverged(loss: torch.Tensor, step: int, saved_step: int | None, cfg: TrainConfig, out: Path,
                      world: int) -> None:
    """A non-finite loss (on any rank: all stop together) ends the run before it writes a model
    of NaNs; the last resume state on disk is kept."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    if world > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item():
        kept = (f"the resume state of step {saved_step} in {out} is kept" if saved_step
                else "nothing was written")
        raise TokenizerError(f"step {step}: the loss is {loss.item()} (the run diverged; {kept}); lower --lr "
                             f"(now {cfg.lr:g}) or the loss weights and train again")


def losses_skipped(cfg: TrainConfig, lpips_on: bool) -> list[str]:
    """The losses this run's settings name but will not run, each in one plain sentence."""
    out = []
    if cfg.perceptual_weight > 0 and not lpips_on:
        out.append(f"no LPIPS: --perceptual-weight is {cfg.perceptual_weight} (preset {cfg.preset}) but no VGG16 weights "
                   "were found (give --lpips-vgg PATH or $COGALIGN_LPIPS_VGG, torchvision's vgg16-397923af.pth); "
                   "this run trains without the perceptual loss")
    if cfg.disc_weight > 0 and cfg.disc_start >= cfg.steps:
        out.append(f"no GAN: the discriminator starts at step {cfg.disc_start} (--disc-start) but the run stops at "
                   f"step {cfg.steps} (--steps); raise --steps or lower --disc-start to train it")
    return out


def write_metrics(out: Path, metrics: dict) -> None:
    import json

    with open(out / METRICS_FILE, "w", encoding="utf-8") as fh:
        json.dump({k: v for k, v in metrics.items() if k != "model"}, fh, indent=1)


def codebooks_equal_across_ranks(model: VQAutoencoder) -> bool:
    """True when every rank holds the same codebook (for tests and checks)."""
    cb = model.codebook.detach().clone()
    ref = cb.clone()
    dist.broadcast(ref, 0)
    ok = torch.tensor([int(torch.equal(cb, ref))])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())

