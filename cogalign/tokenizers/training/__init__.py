"""`cogalign vq train`: a taming-style VQGAN recipe (data, model, losses, loop, export)."""
from cogalign.tokenizers.training.config import TrainConfig
from cogalign.tokenizers.training.data import ImageRef, collect_images, load_rgb, to_model_input
from cogalign.tokenizers.training.export import evaluate, export_taming
from cogalign.tokenizers.training.loop import train_vq
from cogalign.tokenizers.training.model import PRESETS, VQAutoencoder, make_ddconfig

__all__ = ["TrainConfig", "ImageRef", "collect_images", "load_rgb", "to_model_input", "evaluate", "export_taming",
           "train_vq", "PRESETS", "VQAutoencoder", "make_ddconfig"]
