"""Draw the sample images of the image pipeline with Pillow (tiny, our own).

Each file is named after the class ``image_pipeline`` must rank first for
it: a field of that class's colour with a smaller shape of another colour
drawn on it, in sizes that are not 64x64 so ``preprocess`` has to resize.

    ember.png    48x40 RGB PNG   ember field, chalk circle
    lagoon.jpg   72x48 JPEG      lagoon field, cobalt stripe
    chalk.png    40x40 greyscale PNG (mode L)  light grey field, dark square

Rerun to rewrite them: ``python examples/pipelines/image_samples/make_images.py``.
The PNGs come out the same byte for byte; the JPEG may differ slightly with
the libjpeg version, its classification does not.
"""

from __future__ import annotations

import io
import pathlib
import sys

from PIL import Image, ImageDraw

HERE = pathlib.Path(__file__).resolve().parent


def ember() -> Image.Image:
    image = Image.new("RGB", (48, 40), (220, 60, 40))
    ImageDraw.Draw(image).ellipse((30, 4, 44, 18), fill=(235, 235, 225))
    return image


def lagoon() -> Image.Image:
    image = Image.new("RGB", (72, 48), (30, 150, 160))
    ImageDraw.Draw(image).rectangle((0, 36, 71, 41), fill=(30, 60, 190))
    return image


def chalk() -> Image.Image:
    image = Image.new("L", (40, 40), 232)
    ImageDraw.Draw(image).rectangle((4, 4, 11, 11), fill=60)
    return image


def encoded() -> dict[str, bytes]:
    """File name -> encoded bytes."""
    files = {}
    for name, draw, fmt, options in (
        ("ember.png", ember, "PNG", {}),
        ("lagoon.jpg", lagoon, "JPEG", {"quality": 85}),
        ("chalk.png", chalk, "PNG", {}),
    ):
        buffer = io.BytesIO()
        draw().save(buffer, format=fmt, **options)
        files[name] = buffer.getvalue()
    return files


def main() -> int:
    for name, data in encoded().items():
        (HERE / name).write_bytes(data)
        print(f"wrote {HERE / name} ({len(data)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
