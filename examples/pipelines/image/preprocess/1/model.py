"""preprocess: encoded image bytes -> normalised CHW float32 pixels.

IMAGE is BYTES with dims [1]: one JPEG, PNG (or any format Pillow reads)
per item. With max_batch_size > 0 it arrives as an object array shaped
[batch, 1]. Each image is decoded with Pillow, converted to RGB (greyscale,
palette and alpha images included), resized to the PIXELS dims of the
config (64x64) with bilinear filtering, scaled to 0..1 and normalised per
channel with ImageNet's mean and std. PIXELS is FP32 [batch, 3, H, W].

An item that is not a readable image fails the batch with a ValueError
naming IMAGE and the item.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
DEFAULT_SIZE = 64


def _output_shape(config: dict, name: str) -> list[int]:
    for tensor in config.get("outputs", []):
        if tensor["name"] == name:
            return list(tensor["shape"])
    return []


class Predictor:
    def __init__(self, config: dict):
        self.name = config.get("name", "preprocess")
        # The shape may or may not carry a leading -1 batch axis; H and W are its last two dims.
        shape = _output_shape(config, "PIXELS")
        if len(shape) >= 2 and shape[-1] > 0 and shape[-2] > 0:
            self.height, self.width = int(shape[-2]), int(shape[-1])
        else:
            self.height = self.width = DEFAULT_SIZE

    def pixels(self, data: bytes) -> np.ndarray:
        """One encoded image -> FP32 [3, H, W]."""
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB").resize((self.width, self.height), Image.Resampling.BILINEAR)
            rgb = np.asarray(image, dtype=np.float32) / np.float32(255)
        return ((rgb - MEAN) / STD).transpose(2, 0, 1).astype(np.float32)

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = np.asarray(inputs["IMAGE"], dtype=object)
        batch = images.shape[0] if images.ndim else 1
        items = images.reshape(batch, -1)
        out = np.empty((batch, 3, self.height, self.width), dtype=np.float32)
        for index in range(batch):
            if items.shape[1] != 1:
                raise ValueError(f"{self.name}: IMAGE item {index} holds {items.shape[1]} elements, expected 1")
            data = items[index, 0]
            if isinstance(data, str):
                data = data.encode("latin-1")
            try:
                out[index] = self.pixels(bytes(data))
            except (UnidentifiedImageError, OSError, ValueError) as err:
                raise ValueError(f"{self.name}: IMAGE item {index} is not a readable image: {err}") from None
        return {"PIXELS": out}
