"""VQ tokenizers: the `VQTokenizer` interface, the taming backend, presets."""
from cogalign.tokenizers.base import TokenizerError, VQTokenizer
from cogalign.tokenizers.presets import list_presets, load_tokenizer
from cogalign.tokenizers.taming import TamingVQTokenizer, load_taming

__all__ = [
    "VQTokenizer",
    "TokenizerError",
    "TamingVQTokenizer",
    "load_taming",
    "load_tokenizer",
    "list_presets",
]
