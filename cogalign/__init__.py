"""cogalign: cognition-alignment turns (VQ indices, RGB values) for LLaVA-style data.

The public names, imported on first use (so `import cogalign` stays cheap and loads no torch):
`Augmenter` (the per-record API), `ExpandOptions`, `RecordError`, `CogalignError`, `Runtime`,
`run_expand` (the whole `cogalign expand` job; `cogalign.expand` is the subpackage of the run).
"""
__version__ = "0.4.0"

__all__ = ["Augmenter", "ExpandOptions", "RecordError", "CogalignError", "Runtime", "run_expand", "__version__"]

_LAZY = {
    "Augmenter": ("cogalign.augment", "Augmenter"),
    "ExpandOptions": ("cogalign.options", "ExpandOptions"),
    "RecordError": ("cogalign.errors", "RecordError"),
    "CogalignError": ("cogalign.errors", "CogalignError"),
    "Runtime": ("cogalign.expand.executor", "Runtime"),
    "run_expand": ("cogalign.expand.executor", "expand"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cogalign' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
