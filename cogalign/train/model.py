"""Load a LLaVA-family model and its processor, or build `tiny` / `tiny-next`: a small random
LLaVA-1.5 / LLaVA-NeXT (anyres tiles) — CLIP-style vision tower, projector, Llama-style LM — with a
byte-level BPE tokenizer trained on the shards."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from cogalign.errors import CogalignError

__all__ = ["load", "tiny_model", "tiny_processor", "tiny_next_processor", "train_tokenizer", "shard_texts",
           "add_vq_tokens", "codebook_size", "resize_mode", "require_transformers", "quiet_hub_logs", "TINY_MODELS", "TINY_IMAGE",
           "TINY_PATCH", "TINY_GRID", "TINY_VOCAB", "SPECIALS"]

TINY_IMAGE, TINY_PATCH = 32, 8
TINY_GRID = [[32, 64], [64, 32], [64, 64]]  # tiny-next's anyres resolutions
TINY_MODELS = ("tiny", "tiny-next")
TINY_VOCAB = 1024
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]


def require_transformers():
    """Raise `CogalignError` with the install command when transformers is missing."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise CogalignError('training needs transformers: pip install "cogalign[train]"') from None


def shard_texts(out: Path, limit_chars: int = 4000) -> Iterator[str]:
    """Every turn's text in the shards (long answers cut: the tokenizer only needs their alphabet),
    and the vicuna_v1 frame the collator wraps them in."""
    from cogalign.train.collate import VICUNA_SYSTEM
    from cogalign.train.data import shard_files
    from cogalign.expand.writer import read_shard

    yield from [VICUNA_SYSTEM + " USER: ", " ASSISTANT: "] * 16
    for f in shard_files(out):
        for rec in read_shard(f):
            for turn in rec.get("conversations") or []:
                yield str(turn.get("value", ""))[:limit_chars]


def train_tokenizer(texts: Iterator[str], vocab_size: int = TINY_VOCAB):
    """A small byte-level BPE tokenizer trained on `texts`, with the special tokens (`<image>`, `<s>`, `</s>`, …)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})


def tiny_processor(tokenizer):
    """A LLaVA processor for the `tiny` model: CLIP image processor at the tiny size, with `tokenizer`."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(size={"shortest_edge": TINY_IMAGE},
                                         crop_size={"height": TINY_IMAGE, "width": TINY_IMAGE})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=TINY_PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def tiny_next_processor(tokenizer):
    """A LLaVA-NeXT processor (anyres tiles) for the `tiny-next` model, with `tokenizer`."""
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    image_processor = LlavaNextImageProcessor(size={"shortest_edge": TINY_IMAGE}, image_grid_pinpoints=TINY_GRID,
                                              crop_size={"height": TINY_IMAGE, "width": TINY_IMAGE},
                                              do_center_crop=False)
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=TINY_PATCH,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)


def tiny_model(tokenizer, seed: int = 0, hidden: int = 128, layers: int = 2, next_: bool = False):
    """A randomly initialised tiny LLaVA (or LLaVA-NeXT with `next_`): CLIP tower, projector, Llama LM sized to
    `tokenizer`."""
    import torch
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaNextConfig, LlavaNextForConditionalGeneration)

    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=TINY_IMAGE, patch_size=TINY_PATCH, projection_dim=64)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       tie_word_embeddings=False)
    common = dict(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                  vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(seed)
    if next_:
        return LlavaNextForConditionalGeneration(LlavaNextConfig(image_grid_pinpoints=TINY_GRID, **common))
    return LlavaForConditionalGeneration(LlavaConfig(**common))


@contextmanager
def quiet_hub_logs():
    """huggingface_hub's warnings off while a model loads: offline, it logs two lines per retry of every file
    (dozens) above the one-line error that follows."""
    from huggingface_hub.utils import logging as hub_logging

    level = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()
    try:
        yield
    finally:
        hub_logging.set_verbosity(level)


def load(model: str, data: Optional[Path] = None, seed: int = 0, tiny_layers: int = 2, tiny_hidden: int = 128):
    """(model, processor) for a Hub id / local folder (Auto classes), or a fresh `tiny` / `tiny-next`."""
    require_transformers()
    if model in TINY_MODELS:
        if data is None:
            raise CogalignError(f"--model {model} trains its tokenizer on the shards: give --data")
        tokenizer = train_tokenizer(shard_texts(data))
        processor = (tiny_next_processor if model == "tiny-next" else tiny_processor)(tokenizer)
        return tiny_model(tokenizer, seed, tiny_hidden, tiny_layers, next_=model == "tiny-next"), processor
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        with quiet_hub_logs():
            processor = AutoProcessor.from_pretrained(model)
            net = AutoModelForImageTextToText.from_pretrained(model)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CogalignError(f"cannot load model {model!r}: {first} (give a LLaVA checkpoint folder, a Hub id, or tiny)") from None
    return net, processor


def add_vq_tokens(model, processor, k: int) -> int:
    """`--vq-tokens special`: add <vq_0>..<vq_{k-1}> and resize the embeddings; returns tokens added."""
    from cogalign.train.collate import vq_token_names

    added = processor.tokenizer.add_tokens(vq_token_names(k))
    if added:
        model.resize_token_embeddings(len(processor.tokenizer))
    return added


def codebook_size(out: Path) -> Optional[int]:
    """The VQ codebook size of the run's tokenizer: from the catalog for a known name (`demo-f8-4096`,
    `ldm-vq-f8`), else from the tokenizer its `--vq` names when that loads here with the run's
    tokenizer hash; None when neither says. (A name's last digits are no codebook size: `ldm-vq-f8`,
    `alice/tok@<sha>`.)"""
    import orjson

    from cogalign.expand.layout import MANIFEST
    from cogalign.tokenizers.catalog import BY_NAME

    try:
        opts = orjson.loads((Path(out) / MANIFEST).read_bytes())["options"]
    except (OSError, KeyError, ValueError):
        return None
    name = opts.get("tokenizer_name") or ""
    known = BY_NAME.get("demo" if name == "demo-f8-4096" else name)
    if known is not None:
        return known.codes
    if not opts.get("vq"):
        return None
    try:
        from cogalign.tokenizers import load_tokenizer

        tok = load_tokenizer(str(opts["vq"]))
    except CogalignError:
        return None
    return tok.codebook_size if tok.content_hash == opts.get("tokenizer_hash") else None


def resize_mode(out: Path) -> str:
    """`expand`'s --resize (stretch, pad, crop) from the output's cogalign.json; stretch if it does not say."""
    import orjson

    from cogalign.expand.layout import MANIFEST

    try:
        options = orjson.loads((Path(out) / MANIFEST).read_bytes()).get("options") or {}
    except (OSError, ValueError):
        return "stretch"
    return options.get("resize") or "stretch"
