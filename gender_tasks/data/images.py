"""Image decoding, in one place: to RGB arrays at a training size, and to a perceptual hash.

JPEGs decode in draft mode (libjpeg's DCT scaling) when the target is much smaller than the
image: several times faster, and every entropy-coded byte is still decoded, so truncated or
corrupt files fail here as they would at full size.
"""

from __future__ import annotations

import io

import numpy as np

# The perceptual hash only needs 32x32 px: JPEGs are decoded no smaller than this for it.
PHASH_DECODE_SIZE = 64


def decode_resize(data: bytes, size: int) -> np.ndarray:
    """Decode an image to RGB and resize it to size x size (uint8 HWC)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        if img.format == "JPEG":
            img.draft("RGB", (size, size))
        img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
        return np.asarray(img, dtype=np.uint8)


def image_phash(img) -> str:
    """The 64-bit perceptual hash (ImageHash's phash) of an opened PIL image, as 16 hex digits."""
    import imagehash

    return str(imagehash.phash(img))


def phash_of_bytes(data: bytes) -> str:
    """Decode an image (JPEGs at reduced scale) and return its phash; raises what PIL raises."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        if img.format == "JPEG":
            img.draft("L", (PHASH_DECODE_SIZE, PHASH_DECODE_SIZE))
        img.load()
        return image_phash(img)
