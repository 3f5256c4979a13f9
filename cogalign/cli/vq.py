"""`cogalign vq ...`: train, inspect, evaluate and convert VQ tokenizers."""
from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from pathlib import Path
from typing import List, Optional

import typer

from cogalign.cli.util import fail, say
from cogalign.errors import CogalignError

vq_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                     help="Train, inspect, evaluate and convert VQ tokenizers (taming VQGAN layout).")


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        fail(f"--{what} must be comma-separated integers, got {text!r}")


def _opt_ints(text: Optional[str], what: str) -> Optional[tuple[int, ...]]:
    return None if text is None else tuple(_ints(text, what))


_PRESET = "(default: from --preset)"


@vq_app.command("train")
def train(
    images: List[Path] = typer.Argument(..., help="Training images: files, folders (searched recursively), or LLaVA inputs (.json, .jsonl, .parquet: the first image of each record, resolved as `expand` does)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write model.safetensors, config.yaml, train_metrics.json and the resume state train_state.pt to."),
    preset: str = typer.Option("demo", "--preset", help="Architecture and losses: demo (small f8, L1+MSE, no GAN: the shipped demo's recipe), vqgan-4096 (latent-diffusion vq-f8 with 4096 codes, L1 + LPIPS + PatchGAN), vqgan-f16-16384 (taming ImageNet f16)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last saved step (same settings and images; raise --steps to train longer). Default: off."),
    force: bool = typer.Option(False, "--force", help="Replace an earlier `vq train` output in --out (only the files vq train writes are removed). Default: off."),
    steps: int = typer.Option(2000, "--steps", help="Total optimizer steps (with --resume: the step to stop at)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Crops per step per rank."),
    crop: int = typer.Option(128, "--crop", help="Crop size in pixels (a multiple of f)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Adam learning rate, constant after the preset's warm-up. Default: demo 1e-3; GAN presets taming's 4.5e-6 x batch size x ranks."),
    codes: Optional[int] = typer.Option(None, "--codes", help=f"Codebook size {_PRESET}."),
    ch: Optional[int] = typer.Option(None, "--ch", help=f"Base channel width, a multiple of 32 {_PRESET}."),
    ch_mult: Optional[str] = typer.Option(None, "--ch-mult", help=f"Channel multipliers per level; f = 2^(levels-1), so 1,2,2,4 gives f=8 {_PRESET}."),
    num_res_blocks: Optional[int] = typer.Option(None, "--res-blocks", help=f"Residual blocks per encoder level {_PRESET}."),
    z_channels: Optional[int] = typer.Option(None, "--z-channels", help=f"Encoder output channels {_PRESET}."),
    embed_dim: Optional[int] = typer.Option(None, "--embed-dim", help=f"Codebook vector size {_PRESET}."),
    attn_resolutions: Optional[str] = typer.Option(None, "--attn-resolutions", help=f"Feature-map sizes with attention blocks, counted from a 256-px input, comma-separated ('' for none) {_PRESET}."),
    disc_weight: Optional[float] = typer.Option(None, "--disc-weight", help=f"PatchGAN loss weight (times taming's adaptive weight); 0 turns the discriminator off {_PRESET}."),
    disc_start: Optional[int] = typer.Option(None, "--disc-start", help=f"Step at which the discriminator starts {_PRESET}."),
    perceptual_weight: Optional[float] = typer.Option(None, "--perceptual-weight", help=f"LPIPS weight; 0 turns it off {_PRESET}."),
    lpips_vgg: Optional[Path] = typer.Option(None, "--lpips-vgg", help="torchvision's VGG16 weights (vgg16-397923af.pth) for LPIPS. Default: $COGALIGN_LPIPS_VGG, else torchvision's cache; without them the run goes on without LPIPS."),
    commitment_weight: float = typer.Option(0.25, "--commitment-weight", help="Weight of the commitment loss (the encoder pulled towards its codes), as taming's beta."),
    codebook_weight: float = typer.Option(1.0, "--codebook-weight", help="Weight of the quantizer's loss in the total, as taming's codebook_weight."),
    ema_decay: float = typer.Option(0.99, "--ema-decay", help="Decay of the EMA codebook updates, between 0 and 1."),
    dead_code_threshold: Optional[float] = typer.Option(None, "--dead-code-threshold", help="Re-seed codes whose EMA use per step falls below this. Default: min(2, 0.05 x latents per step / codes)."),
    kmeans_latents: Optional[int] = typer.Option(None, "--kmeans-latents", help="Encoder outputs used for the k-means codebook init. Default: 2 x codes."),
    decoder_dtype: str = typer.Option("float32", "--decoder-dtype", help="Storage type of decoder.* and post_quant_conv.* (float32, float16, bfloat16); the encoder path is always float32."),
    seed: int = typer.Option(0, "--seed", help="Random seed (weights, crops, data order)."),
    threads: int = typer.Option(1, "--threads", help="torch CPU threads per rank."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto (under torchrun: each rank's GPU)."),
    bf16: bool = typer.Option(True, "--bf16/--fp32", help="bf16 autocast on GPUs (the quantizer stays float32); ignored on the CPU."),
    workers: int = typer.Option(0, "--workers", help="Data loader processes decoding and cropping images (0: in the training process)."),
    save_every: int = typer.Option(500, "--save-every", help="Save the resume state every this many steps (and at the end)."),
    image_root: Optional[Path] = typer.Option(None, "--image-root", help="Folder that a LLaVA input's image paths are relative to. Default: the input's folder."),
    allow_absolute_paths: bool = typer.Option(False, "--allow-absolute-paths", help="Accept absolute image paths in a LLaVA input. Default: off."),
    evaluate_after: bool = typer.Option(True, "--eval/--no-eval", help="Evaluate PSNR and codebook usage on the first 64 training images afterwards."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar with loss, PSNR and codebook use (a log line every 50 steps when not on a terminal)."),
) -> None:
    """Train a taming-layout VQGAN and export it (taming config.yaml + model.safetensors)."""
    from cogalign.tokenizers.training import evaluate, train_vq
    from cogalign.tokenizers.training.loop import write_metrics

    try:
        metrics = train_vq(
            images, out, resume=resume, force=force, image_root=image_root, allow_absolute=allow_absolute_paths,
            progress=progress, log=say, preset=preset, codes=codes, ch=ch, ch_mult=_opt_ints(ch_mult, "ch-mult"),
            num_res_blocks=num_res_blocks, z_channels=z_channels, embed_dim=embed_dim,
            attn_resolutions=_opt_ints(attn_resolutions, "attn-resolutions"), disc_weight=disc_weight,
            disc_start=disc_start, perceptual_weight=perceptual_weight, lr=lr, steps=steps, batch_size=batch_size,
            crop=crop, seed=seed, threads=threads, dead_code_threshold=dead_code_threshold,
            decoder_dtype=decoder_dtype, kmeans_latents=kmeans_latents, device=device, bf16=bf16, workers=workers, save_every=save_every,
            lpips_vgg=str(lpips_vgg) if lpips_vgg else None, commitment_weight=commitment_weight,
            codebook_weight=codebook_weight, ema_decay=ema_decay)
        if evaluate_after and metrics["rank"] == 0:
            ev = evaluate(out, images, max_images=64, image_root=image_root, allow_absolute=allow_absolute_paths)
            ev.pop("psnr_db_per_image", None)
            ev.pop("code_histogram", None)
            say(f"eval: PSNR {ev['psnr_db']:.2f} dB at {ev['resolution']}px, codebook usage "
                f"{ev['codes_used']}/{ev['codebook_size']} ({100 * ev['codebook_usage']:.1f}%) at "
                f"{ev['usage_resolution']}px on {ev['images']} images")
            metrics["eval"] = ev
            write_metrics(out, metrics)
    except CogalignError as e:
        fail(e)
    from cogalign.expand.distributed import leave

    leave()  # after rank 0's eval


@vq_app.command("info")
def info(
    spec: str = typer.Argument("demo", help="A name (demo, vqgan-4096, ...: see `vq list`), hf://OWNER/REPO or a taming checkpoint folder/file."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow .ckpt files that pickle Python objects (runs code from the file: only for sources you trust). Default: off."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text. Default: off."),
) -> None:
    """Name, content hash, codebook size, downsampling factor and parameter counts of a tokenizer.

    parameters_encoder counts what encoding runs (encoder, quant_conv, the quantizer);
    parameters_decoder the decoder and post_quant_conv when the checkpoint has them."""
    from cogalign.tokenizers import list_presets
    from cogalign.tokenizers.checkpoints import decoder_shapes, find_checkpoint, read_state_dict, strip_prefix
    from cogalign.tokenizers.presets import resolve
    from cogalign.tokenizers.taming import load_taming

    try:
        path, name = resolve(spec)
        tok = load_taming(path, device="cpu", trust_pickle=trust_pickle, name=name)
        keys = strip_prefix(read_state_dict(find_checkpoint(path)[0], trust_pickle=trust_pickle))
        shapes = decoder_shapes(tok.params)
        has_decoder = any(k in keys for k in shapes)
    except CogalignError as e:
        fail(e)
    d = tok.describe()
    d["parameters_encoder"] = int(tok.parameter_count())
    d["parameters_decoder"] = int(sum(math.prod(s) for s in shapes.values())) if has_decoder else None
    d["parameters_total"] = d["parameters_encoder"] + (d["parameters_decoder"] or 0)
    d["quantizer"] = getattr(tok, "quantizer", None)
    d["checkpoint"] = getattr(tok, "source", None)
    d["config"] = getattr(tok, "config_path", None)
    if spec in list_presets():
        d["preset"] = spec
    if as_json:
        typer.echo(json.dumps(d, indent=1))
        return
    for k in ("name", "content_hash", "codebook_size", "downsample", "parameters_encoder", "parameters_decoder",
              "parameters_total", "quantizer", "checkpoint", "config"):
        note = {"parameters_encoder": " (encoder, quant_conv, quantizer: what encoding runs)",
                "parameters_decoder": " (decoder, post_quant_conv)" if has_decoder else " (no decoder in the checkpoint)"}
        typer.echo(f"{k}: {d[k]}{note.get(k, '')}")


@vq_app.command("convert")
def convert(
    ckpt: Path = typer.Argument(..., help="Checkpoint to convert (.ckpt / .pth, e.g. a Lightning checkpoint).", exists=True, dir_okay=False),
    out: Path = typer.Argument(..., help="Output .safetensors file; the model yaml is copied beside it as <stem>.yaml."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Unpickle Python objects in the checkpoint (runs code from the file: only for sources you trust). Default: off."),
    config: Optional[Path] = typer.Option(None, "--config", help="The model yaml. Default: found beside the checkpoint (same stem, config.yaml, the only yaml, or ../configs/).", exists=True, dir_okay=False),
    force: bool = typer.Option(False, "--force", help="Overwrite OUT if it exists. Default: off."),
) -> None:
    """Rewrite a checkpoint as safetensors with only the model tensors, checked against its yaml.

    Keeps encoder.*, decoder.*, quant_conv.*, post_quant_conv.* and quantize.*; drops loss.*
    (discriminator, LPIPS), optimizer state and pickled objects. The encoder path, and the decoder
    with post_quant_conv when the checkpoint has one, must match the yaml's model key for key and
    shape for shape. The yaml is copied beside OUT."""
    from safetensors.torch import save_file

    from cogalign.tokenizers.checkpoints import (
        DECODER_PREFIXES, KEPT_PREFIXES, check_decoder, check_state_dict, find_checkpoint, quantizer_kind, read_config,
        read_state_dict, select_model_keys, strip_prefix)
    from cogalign.tokenizers.taming import TamingVQTokenizer

    if out.suffix != ".safetensors":
        fail(f"{out}: the output must end in .safetensors")
    producer = _safetensors_producer(out) if out.exists() else None
    ours = producer == "cogalign vq convert"
    if out.exists():
        if not force:
            fail(f"{out}: exists; pass --force to overwrite")
        if not ours:
            fail(f"{out}: exists and was not written by `vq convert` ({producer or 'unknown producer'}); "
                 "--force never replaces a model it did not write: choose another OUT")
    try:
        cfg_path = config or find_checkpoint(ckpt)[1]
        params, target = read_config(cfg_path)
        raw = strip_prefix(read_state_dict(ckpt, trust_pickle=trust_pickle))
        kept = select_model_keys(raw)
        with contextlib.redirect_stdout(io.StringIO()):
            model = TamingVQTokenizer(params, name=ckpt.stem, quantizer=quantizer_kind(target, set(kept)))
        check_state_dict(kept, model.state_dict(), ckpt, cfg_path)
        has_decoder = check_decoder(raw, params, ckpt, cfg_path)
    except CogalignError as e:
        fail(e)
    yaml_out = out.with_suffix(".yaml")
    if yaml_out.exists() and yaml_out.resolve() != cfg_path.resolve() \
            and yaml_out.read_bytes() != cfg_path.read_bytes() and not (force and ours):
        fail(f"{yaml_out}: exists and is not {cfg_path} (the yaml vq convert copies beside OUT); it is never "
             "replaced: choose another OUT")
    model_keys = KEPT_PREFIXES + DECODER_PREFIXES
    tensors = {k: v.contiguous() for k, v in raw.items() if k.startswith(model_keys)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"producer": "cogalign vq convert", "source": ckpt.name})
    tmp.replace(out)
    out.chmod(0o644)  # safetensors writes 0600
    if cfg_path.resolve() != yaml_out.resolve():
        shutil.copyfile(cfg_path, yaml_out)
    dropped = len(raw) - len(tensors)
    say(f"wrote {out} ({len(tensors)} tensors; {dropped} others dropped) and {yaml_out}")
    if has_decoder and quantizer_kind(target, set(kept)) == "gumbel":
        say("decoder: present, checked against the yaml (a Gumbel model: vq eval reports codebook use only)")
    elif has_decoder:
        say("decoder: present, checked against the yaml (vq eval can report PSNR)")
    else:
        say("decoder: none in this checkpoint (encoder only: it encodes, but vq eval cannot report PSNR)")


def _safetensors_producer(path: Path) -> Optional[str]:
    """The `producer` a cogalign safetensors file records (vq convert; vq train keeps it in `cogalign`)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
    except Exception:  # noqa: BLE001 - not a safetensors file at all
        return None
    if "producer" in meta:
        return meta["producer"]
    try:
        return json.loads(meta.get("cogalign", "{}")).get("producer")
    except ValueError:
        return None


@vq_app.command("eval")
def eval_(
    spec: str = typer.Argument(..., help="A name (demo, vqgan-4096, ...: see `vq list`), hf://OWNER/REPO\\[@REVISION]\\[/SUBFOLDER], or a taming checkpoint folder/file."),
    images: List[Path] = typer.Argument(..., help="Images: files, folders (searched recursively), or LLaVA inputs (.json, .jsonl, .parquet)."),
    resolution: int = typer.Option(256, "--resolution", help="Images are stretched to this square size for PSNR, SSIM and LPIPS (a multiple of f)."),
    usage_resolution: int = typer.Option(672, "--usage-resolution", help="Images are stretched to this square size and encoded whole for the codebook use."),
    max_images: Optional[int] = typer.Option(None, "--max-images", help="Evaluate only the first N images. Default: all."),
    lpips_vgg: Optional[Path] = typer.Option(None, "--lpips-vgg", help="torchvision's VGG16 weights (vgg16-397923af.pth) for LPIPS. Default: $COGALIGN_LPIPS_VGG, else torchvision's cache; without them LPIPS is left out."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow .ckpt files that pickle Python objects (runs code from the file). Default: off."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (with per-image PSNR keyed by each image's path, and the codebook histogram) instead of text. Default: off."),
    image_root: Optional[Path] = typer.Option(None, "--image-root", help="Folder that a LLaVA input's image paths are relative to. Default: the input's folder."),
    allow_absolute_paths: bool = typer.Option(False, "--allow-absolute-paths", help="Accept absolute image paths in a LLaVA input. Default: off."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bar. Default: shown on a terminal."),
) -> None:
    """Reconstruction PSNR, SSIM and LPIPS (need the decoder in the checkpoint) and codebook use
    (codes used, dead codes, perplexity, entropy) on images, streamed one at a time.

    rFID is not reported: it needs Inception weights, which cogalign never downloads."""
    from cogalign.tokenizers.presets import resolve
    from cogalign.tokenizers.training import evaluate

    try:
        path, name = resolve(spec)  # the resolver of every command: names, hf:// specs, paths
        res = evaluate(path, images, resolution=resolution, usage_resolution=usage_resolution, trust_pickle=trust_pickle,
                       image_root=image_root, name=name, max_images=max_images, progress=not no_progress,
                       lpips_vgg=lpips_vgg, allow_absolute=allow_absolute_paths)
    except CogalignError as e:
        fail(e)
    if as_json:
        typer.echo(json.dumps(res, indent=1))
        return

    def fmt(v, spec=".2f", unit=""):
        return f"n/a ({res['quality_not_measured']})" if v is None and res.get("quality_not_measured") else \
            "n/a" if v is None else f"{v:{spec}}{unit}"

    typer.echo(f"tokenizer: {res['tokenizer']} ({res['content_hash']})")
    typer.echo(f"images: {res['images']}" + (f" ({len(res['images_undecodable'])} undecodable, skipped)"
                                             if res["images_undecodable"] else ""))
    typer.echo(f"psnr at {res['resolution']}px: {fmt(res['psnr_db'], '.2f', ' dB')}")
    typer.echo(f"ssim at {res['resolution']}px: {fmt(res['ssim'], '.4f')}")
    typer.echo(f"lpips at {res['resolution']}px: {fmt(res['lpips'], '.4f')}")
    typer.echo(f"codebook usage at {res['usage_resolution']}px: {res['codes_used']}/{res['codebook_size']} "
               f"({100 * res['codebook_usage']:.1f}%), dead codes {res['dead_codes']}, perplexity "
               f"{res['perplexity']:.1f}, entropy {res['entropy_bits']:.2f} of {res['max_entropy_bits']:.2f} bits")
    for note in res["notes"]:
        say(note)
