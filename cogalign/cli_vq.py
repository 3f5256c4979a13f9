"""`cogalign vq ...`: train, inspect, evaluate and convert VQ tokenizers."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from typing import List, Optional

import typer

from cogalign.cli_util import fail, say
from cogalign.errors import CogalignError

vq_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                     help="Train, inspect, evaluate and convert VQ tokenizers (taming VQGAN layout).")


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        fail(f"--{what} must be comma-separated integers, got {text!r}")


@vq_app.command("train")
def train(
    images: List[Path] = typer.Argument(..., help="Training images: files and/or folders (searched recursively)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write model.safetensors, config.yaml and train_metrics.json to."),
    codes: int = typer.Option(4096, "--codes", help="Codebook size."),
    steps: int = typer.Option(2000, "--steps", help="Optimizer steps."),
    batch_size: int = typer.Option(8, "--batch-size", help="Crops per step."),
    crop: int = typer.Option(128, "--crop", help="Crop size in pixels (a multiple of f)."),
    lr: float = typer.Option(1e-3, "--lr", help="Peak Adam learning rate (warm-up, then cosine decay to 10%)."),
    ch: int = typer.Option(32, "--ch", help="Base channel width (a multiple of 32)."),
    ch_mult: str = typer.Option("1,2,2,4", "--ch-mult", help="Channel multipliers per level; f = 2^(levels-1), so 1,2,2,4 gives f=8."),
    num_res_blocks: int = typer.Option(1, "--res-blocks", help="Residual blocks per encoder level (the decoder has one more)."),
    z_channels: int = typer.Option(4, "--z-channels", help="Encoder output channels."),
    embed_dim: int = typer.Option(4, "--embed-dim", help="Codebook vector size."),
    attn_resolutions: str = typer.Option("", "--attn-resolutions", help="Feature-map sizes that get attention blocks, counted from a 256-px input (256 / 2^level), comma-separated; taming's middle attention block is always there."),
    dead_code_threshold: Optional[float] = typer.Option(None, "--dead-code-threshold", help="Re-seed codes whose EMA use per step falls below this. Default: min(2, 0.05 x latents per step / codes)."),
    decoder_dtype: str = typer.Option("float32", "--decoder-dtype", help="Storage type of decoder.* and post_quant_conv.* (float32, float16, bfloat16); the encoder path is always float32."),
    seed: int = typer.Option(0, "--seed", help="Random seed (weights, crops)."),
    threads: int = typer.Option(1, "--threads", help="torch CPU threads."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto."),
    evaluate_after: bool = typer.Option(True, "--eval/--no-eval", help="Evaluate PSNR and codebook usage on the training images afterwards."),
) -> None:
    """Train a taming-layout VQGAN (reconstruction + commitment loss, no GAN) and export it."""
    from cogalign.tokenizers.train import evaluate, train_vq

    if decoder_dtype not in ("float32", "float16", "bfloat16"):
        fail(f"--decoder-dtype must be float32, float16 or bfloat16, not {decoder_dtype!r}")
    try:
        metrics = train_vq(
            images, out, codes=codes, ch=ch, ch_mult=_ints(ch_mult, "ch-mult"), num_res_blocks=num_res_blocks,
            z_channels=z_channels, embed_dim=embed_dim, attn_resolutions=_ints(attn_resolutions, "attn-resolutions"),
            steps=steps, batch_size=batch_size, crop=crop, lr=lr, seed=seed, threads=threads,
            dead_code_threshold=dead_code_threshold, decoder_dtype=decoder_dtype, device=device, log=say)
        metrics.pop("model", None)
        if evaluate_after:
            ev = evaluate(out, images)
            ev.pop("psnr_db_per_image", None)
            say(f"eval: PSNR {ev['psnr_db']:.2f} dB at {ev['resolution']}px, codebook usage "
                 f"{ev['codes_used']}/{ev['codebook_size']} ({100 * ev['codebook_usage']:.1f}%) at {ev['usage_resolution']}px")
            metrics["eval"] = ev
            with open(out / "train_metrics.json", "w", encoding="utf-8") as fh:
                json.dump(metrics, fh, indent=1)
    except CogalignError as e:
        fail(str(e))


@vq_app.command("info")
def info(
    spec: str = typer.Argument("demo", help="A preset name (demo, vqgan-4096) or a taming checkpoint folder/file."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow .ckpt files that pickle Python objects (runs code from the file: only for sources you trust)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
) -> None:
    """Name, content hash, codebook size, downsampling factor and parameter count of a tokenizer."""
    from cogalign.tokenizers import list_presets, load_tokenizer

    try:
        tok = load_tokenizer(spec, device="cpu", trust_pickle=trust_pickle)
    except CogalignError as e:
        fail(str(e))
    d = tok.describe()
    d["parameters"] = int(tok.parameter_count()) if hasattr(tok, "parameter_count") else None
    d["quantizer"] = getattr(tok, "quantizer", None)
    d["checkpoint"] = getattr(tok, "source", None)
    d["config"] = getattr(tok, "config_path", None)
    if spec in list_presets():
        d["preset"] = spec
    if as_json:
        typer.echo(json.dumps(d, indent=1))
        return
    for k in ("name", "content_hash", "codebook_size", "downsample", "parameters", "quantizer", "checkpoint", "config"):
        typer.echo(f"{k}: {d[k]}")


@vq_app.command("convert")
def convert(
    ckpt: Path = typer.Argument(..., help="Checkpoint to convert (.ckpt / .pth, e.g. a Lightning checkpoint).", exists=True, dir_okay=False),
    out: Path = typer.Argument(..., help="Output .safetensors file; the model yaml is copied beside it as <stem>.yaml."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Unpickle Python objects in the checkpoint (runs code from the file: only for sources you trust)."),
    config: Optional[Path] = typer.Option(None, "--config", help="The model yaml. Default: found beside the checkpoint (same stem, config.yaml, the only yaml, or ../configs/).", exists=True, dir_okay=False),
    force: bool = typer.Option(False, "--force", help="Overwrite OUT if it exists."),
) -> None:
    """Rewrite a checkpoint as safetensors with only the model tensors, checked against its yaml.

    Keeps encoder.*, decoder.*, quant_conv.*, post_quant_conv.* and quantize.*; drops loss.*
    (discriminator, LPIPS), optimizer state and pickled objects. The encoder path, and the decoder
    with post_quant_conv when the checkpoint has one, must match the yaml's model key for key and
    shape for shape. The yaml is copied beside OUT."""
    from safetensors.torch import save_file

    from cogalign.tokenizers.checkpoints import (
        _quantizer_kind, _strip_prefix, check_decoder, check_state_dict, find_checkpoint, read_config,
        read_state_dict, select_model_keys)
    from cogalign.tokenizers.taming import TamingVQTokenizer

    if out.suffix != ".safetensors":
        fail(f"{out}: the output must end in .safetensors")
    if out.exists() and not force:
        fail(f"{out}: exists; pass --force to overwrite")
    try:
        cfg_path = config or find_checkpoint(ckpt)[1]
        params, target = read_config(cfg_path)
        raw = _strip_prefix(read_state_dict(ckpt, trust_pickle=trust_pickle))
        kept = select_model_keys(raw)
        with contextlib.redirect_stdout(io.StringIO()):
            model = TamingVQTokenizer(params, name=ckpt.stem, quantizer=_quantizer_kind(target, set(kept)))
        check_state_dict(kept, model.state_dict(), ckpt, cfg_path)
        has_decoder = check_decoder(raw, params, ckpt, cfg_path)
    except CogalignError as e:
        fail(str(e))
    model_keys = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.")
    tensors = {k: v.contiguous() for k, v in raw.items() if k.startswith(model_keys)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"producer": "cogalign vq convert", "source": ckpt.name})
    tmp.replace(out)
    out.chmod(0o644)  # safetensors writes 0600
    yaml_out = out.with_suffix(".yaml")
    if cfg_path.resolve() != yaml_out.resolve():
        shutil.copyfile(cfg_path, yaml_out)
    dropped = len(raw) - len(tensors)
    say(f"wrote {out} ({len(tensors)} tensors; {dropped} others dropped) and {yaml_out}")
    if has_decoder:
        say("decoder: present, checked against the yaml (vq eval can report PSNR)")
    else:
        say("decoder: none in this checkpoint (encoder only: it encodes, but vq eval cannot report PSNR)")


@vq_app.command("eval")
def eval_(
    spec: str = typer.Argument(..., help="A preset name (demo, vqgan-4096) or a taming checkpoint folder/file."),
    images: List[Path] = typer.Argument(..., help="Images: files and/or folders (searched recursively)."),
    resolution: int = typer.Option(256, "--resolution", help="Images are stretched to this square size for the PSNR."),
    usage_resolution: int = typer.Option(672, "--usage-resolution", help="Images are stretched to this square size and encoded whole for the codebook usage."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow .ckpt files that pickle Python objects (runs code from the file)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (with per-image PSNR) instead of text."),
) -> None:
    """Reconstruction PSNR (needs the decoder in the checkpoint) and codebook usage on images."""
    from cogalign.tokenizers.presets import DEMO_DIR, list_presets, vqgan_4096_dir
    from cogalign.tokenizers.train import evaluate

    path = {"demo": DEMO_DIR, "vqgan-4096": vqgan_4096_dir()}.get(spec, Path(spec)) if spec in list_presets() else Path(spec)
    try:
        if spec in list_presets():
            from cogalign.tokenizers import load_tokenizer

            load_tokenizer(spec)  # the preset's own error if it is not installed
        res = evaluate(path, images, resolution=resolution, usage_resolution=usage_resolution, trust_pickle=trust_pickle)
    except CogalignError as e:
        fail(str(e))
    if as_json:
        typer.echo(json.dumps(res, indent=1))
        return
    psnr = "n/a (no decoder in the checkpoint)" if res["psnr_db"] is None else f"{res['psnr_db']:.2f} dB"
    typer.echo(f"tokenizer: {res['tokenizer']} ({res['content_hash']})")
    typer.echo(f"images: {res['images']}")
    typer.echo(f"psnr at {res['resolution']}px: {psnr}")
    typer.echo(f"codebook usage at {res['usage_resolution']}px: {res['codes_used']}/{res['codebook_size']} "
               f"({100 * res['codebook_usage']:.1f}%)")
