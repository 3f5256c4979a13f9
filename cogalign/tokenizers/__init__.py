"""VQ tokenizers: the `VQTokenizer` interface, the taming backend, presets, the decoder half.

    tok = load_tokenizer("demo")          # a preset, hf://OWNER/REPO or a checkpoint path
    idx = tok.encode(images)              # (B, H, W, 3) uint8 -> (B, H/f, W/f) int64
    rgb = tok.decode(idx)                 # -> (B, H, W, 3) uint8, decoder read on first use
    tok.to(torch.bfloat16)                # = tok.set_encoder_mode("bf16"); recorded by describe()
"""
from cogalign.tokenizers.base import TokenizerError, VQTokenizer
from cogalign.tokenizers.decoder import VQDecoder, load_decoder
from cogalign.tokenizers.presets import list_presets, load_decoder_spec, load_tokenizer
from cogalign.tokenizers.taming import TamingVQTokenizer, load_taming

__all__ = [
    "VQTokenizer",
    "TokenizerError",
    "TamingVQTokenizer",
    "load_taming",
    "load_tokenizer",
    "list_presets",
    "VQDecoder",
    "load_decoder",
    "load_decoder_spec",
]
