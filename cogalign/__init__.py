"""cogalign: cognition-alignment turns (VQ indices, RGB values) for LLaVA-style data."""
__version__ = "0.1.0"
