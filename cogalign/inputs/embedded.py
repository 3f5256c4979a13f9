"""An `image` value that carries its own bytes (Hub parquet inputs, `save_to_disk` folders)."""
from __future__ import annotations

__all__ = ["EmbeddedImage"]


class EmbeddedImage(str):
    """A str (the image's path or name, what the output record keeps in `image`) that also
    holds the image file's bytes in `.data`. Workers decode `.data` with the same checks as
    files (`images.load_image_bytes`); nothing is looked up on disk."""

    data: bytes

    def __new__(cls, name: str, data: bytes):
        obj = super().__new__(cls, name)
        obj.data = data
        return obj

    def __reduce__(self):  # keeps `.data` across process boundaries (the worker pool)
        return (EmbeddedImage, (str(self), self.data))
