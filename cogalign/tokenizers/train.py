"""Compatibility names for `cogalign.tokenizers.training` (the `vq train` recipe), which
holds the code: data.py, model.py, losses.py, config.py, state.py, loop.py, export.py."""
from cogalign.tokenizers.training.data import collect_images, from_model_output, load_rgb, resize_rgb, to_model_input
from cogalign.tokenizers.training.export import evaluate, export_taming, psnr_db, taming_config
from cogalign.tokenizers.training.loop import train_vq
from cogalign.tokenizers.training.model import PRESETS, VQAutoencoder, make_ddconfig

__all__ = ["collect_images", "from_model_output", "load_rgb", "resize_rgb", "to_model_input", "evaluate",
           "export_taming", "psnr_db", "taming_config", "train_vq", "PRESETS", "VQAutoencoder", "make_ddconfig"]
