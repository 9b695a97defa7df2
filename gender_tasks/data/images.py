"""Image decoding, in one place: every image becomes 8-bit RGB the same way for training, reports,
predictions and the perceptual hash (the hash sees what training sees).

`decode_rgb` is the one decode: Pillow opens the file; JPEGs decode in draft mode (libjpeg's DCT
scaling) when the target is much smaller than the image (several times faster, and every
entropy-coded byte is still decoded, so truncated or corrupt files fail here as at full size);
the EXIF Orientation is applied (after draft, which only works on the file as stored); then the
pixels become 8-bit RGB by their mode:

- 1, L, RGB, YCbCr, CMYK (Adobe's inverted CMYK JPEGs are un-inverted by Pillow's JPEG reader),
  LAB, HSV: Pillow's convert("RGB"), which is right for these.
- 48/64-bit RGB(A) and 32-bit grey+alpha PNGs: Pillow opens them as 8-bit RGB / RGBA already
  (the high byte of each sample), so they take the paths above and below.
- P, LA, PA, RGBA, RGBa, and L/RGB/P with a transparent colour: composited over BACKGROUND.
- I;16, I;16B, I;16L, I;16N (16-bit grey), I (32-bit int) and F (32-bit float): scaled by hand.
  Pillow 13's convert clips these to 0-255 instead of scaling them (a 16-bit face became pure
  white), so they are divided by their full scale: 65535 for the 16-bit modes; for I and F, which
  keep no bit depth, the smallest standard full scale that holds every pixel (1.0 for floats, 255,
  65535), or the image's own min-max range when it holds negative or larger values. A transparent
  grey value (PNG tRNS) is honoured there too. Non-finite floats are refused (ValueError).

Not handled: embedded ICC profiles are not applied (CMYK and wide-gamut images convert naively,
as Pillow does), and the 16-bit colour key of a 48-bit PNG with tRNS is ignored (Pillow drops the
low bytes before it can be matched).
"""

from __future__ import annotations

import io

import numpy as np

# The perceptual hash only needs 32x32 px: JPEGs are decoded no smaller than this for it.
PHASH_DECODE_SIZE = 64
# Where an image is transparent it shows this colour: white, as image viewers and browsers show a
# cut-out face on a page, so that what a person checks is what the model is trained on.
BACKGROUND = (255, 255, 255)
# Bump when a change here changes any decoded pixel: a shard cache's index records the version that
# decoded it, and one of another version is rebuilt (see shards.INDEX_FORMAT).
DECODE_VERSION = 2
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _full_scale(pixels: np.ndarray, mode: str) -> tuple[float, float]:
    """(black, white) of a high-bit-depth grey image: what maps to 0 and to 255."""
    if mode.startswith("I;16"):
        return 0.0, 65535.0
    low, high = float(pixels.min()), float(pixels.max())
    if low >= 0:
        for white in (1.0, 255.0, 65535.0) if mode == "F" else (255.0, 65535.0):
            if high <= white:
                return 0.0, white
    return low, max(high, low + 1e-12)  # no standard scale holds it: its own range


def _high_bit_to_rgb(img):
    """16-bit and 32-bit grey to 8-bit RGB, scaled (Pillow's convert clips these)."""
    from PIL import Image

    pixels = np.asarray(img)
    if img.mode == "F" and not np.isfinite(pixels).all():
        raise ValueError("a floating-point image holds NaN or infinite pixels")
    black, white = _full_scale(pixels, img.mode)
    # float32, in place: a 40 Mpx image (max_image_pixels) takes 160 MB here, not 320 MB per step.
    # 16-bit values times 255 stay under 2**24, so they scale exactly: round(v / 257).
    scaled = pixels.astype(np.float32)
    scaled -= black
    scaled *= 255
    scaled /= white - black
    grey = np.rint(scaled, out=scaled).clip(0, 255, out=scaled).astype(np.uint8)
    out = Image.fromarray(grey)
    transparent = img.info.get("transparency")
    if isinstance(transparent, int | float):  # PNG tRNS on 16-bit grey: one transparent value
        out.putalpha(Image.fromarray(np.where(pixels == transparent, 0, 255).astype(np.uint8)))
        return _composite(out)
    return out.convert("RGB")


def _composite(img):
    """An image with transparency over BACKGROUND, as RGB."""
    from PIL import Image

    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb8(img):
    """Any opened Pillow image as 8-bit RGB (see the module docstring for each mode)."""
    if img.mode in _HIGH_BIT_MODES:
        return _high_bit_to_rgb(img)
    if img.has_transparency_data:  # an alpha band, or a transparent colour or palette entry
        return _composite(img)
    return img.convert("RGB")


def decode_rgb(data: bytes, size: int | None = None):
    """Decode an image to an upright 8-bit RGB Pillow image; JPEGs at reduced scale, no smaller than
    `size` px on either side, when `size` is given. Raises what Pillow raises for what does not decode."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as img:
        if size and img.format == "JPEG":
            img.draft("RGB", (size, size))  # before the orientation: draft reads the file as stored
        ImageOps.exif_transpose(img, in_place=True)  # loads the pixels
        return to_rgb8(img)


def decode_square(data: bytes, size: int):
    """Decode an image to RGB and resize it to size x size: a Pillow image (decode_resize's pixels)."""
    from PIL import Image

    img = decode_rgb(data, size)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return img


def decode_resize(data: bytes, size: int) -> np.ndarray:
    """Decode an image to RGB and resize it to size x size (uint8 HWC)."""
    return np.asarray(decode_square(data, size), dtype=np.uint8)


def jpeg_data_uri(img, quality: int) -> str:
    """A Pillow image as a JPEG data: URI, for thumbnails inside a self-contained HTML page."""
    import base64

    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def image_phash(img) -> str:
    """The 64-bit perceptual hash (ImageHash's phash) of an opened PIL image, as 16 hex digits."""
    import imagehash

    return str(imagehash.phash(img))


def phash_of_bytes(data: bytes) -> str:
    """Decode an image (decode_rgb, JPEGs at reduced scale) and return its phash; raises what PIL raises."""
    return image_phash(decode_rgb(data, PHASH_DECODE_SIZE))
