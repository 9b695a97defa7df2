"""The one image decode (data.images): every mode becomes the 8-bit RGB a person sees, upright, for
training and for the perceptual hash alike; ingest refuses blank images; a decode change reaches the
caches (shards' index format and decode version) and the model keys (keys.CODE_SOURCES)."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import make_face, write_dataset
from PIL import Image, ImageFilter, ImageOps

from gender_tasks import layout, pipeline
from gender_tasks.data import shards
from gender_tasks.data.folders import IngestError
from gender_tasks.data.images import BACKGROUND, decode_resize, decode_rgb, phash_of_bytes
from gender_tasks.data.ingest import BLANK_STD_LEVELS, ingest_folder, scan_folder
from gender_tasks.data.manifest import read_manifest
from gender_tasks.storage import open_storage
from gender_tasks.training import keys


def _encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def _grey_face(seed: int = 0, size: int = 48) -> np.ndarray:
    return np.asarray(make_face("female", np.random.default_rng(seed), size).convert("L"))


def _rgb_face(seed: int = 0, size: int = 48) -> np.ndarray:
    return np.asarray(make_face("male", np.random.default_rng(seed), size))


def _png16(samples: np.ndarray, color_type: int, transparent: int | None = None) -> bytes:
    """A 16-bit-per-sample PNG, written by hand: Pillow reads 48/64-bit PNGs but cannot write them.
    color_type 0: grey (H, W), 2: RGB (H, W, 3), 4: grey + alpha (H, W, 2), 6: RGBA (H, W, 4);
    `transparent`: a grey value shown as transparent (a tRNS chunk, for color_type 0)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width = samples.shape[:2]
    raw = b"".join(b"\0" + samples[y].astype(">u2").tobytes() for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    trns = chunk(b"tRNS", struct.pack(">H", transparent)) if transparent is not None else b""
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + trns + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))  # fmt: skip


def _to_16bit(pixels8: np.ndarray, rng) -> np.ndarray:
    """8-bit pixels as 16-bit ones with real low bytes: v*256 + noise, so v is the high byte."""
    return (pixels8.astype(np.uint32) * 256 + rng.integers(0, 256, pixels8.shape)).astype(np.uint16)


def _close(a: np.ndarray, b: np.ndarray, levels: float) -> None:
    assert a.shape == b.shape
    diff = np.abs(a.astype(np.int32) - b.astype(np.int32))
    assert diff.max() <= levels, f"off by up to {diff.max()} levels"


def _grey_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2)


# --- high bit depths -----------------------------------------------------------------------------


def test_a_16_bit_grey_png_decodes_scaled_not_white():
    samples = _to_16bit(_grey_face(), np.random.default_rng(1))
    data = _encode(Image.fromarray(samples), "PNG")
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode in ("I;16", "I")  # what Pillow's convert("RGB") clipped to pure white
    reference = np.rint(samples / 257).astype(np.uint8)
    decoded = decode_resize(data, 48)
    _close(decoded, _grey_rgb(reference), 0)
    _close(decoded, _grey_rgb((samples >> 8).astype(np.uint8)), 1)
    assert decoded.std() > 20  # a face, not a blank


def test_16_bit_grey_transparency_shows_the_background():
    grey = _to_16bit(_grey_face(), np.random.default_rng(13))
    grey[:10] = 4242  # the top rows: the transparent value
    data = _png16(grey, 0, transparent=4242)
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode == "I;16" and img.info["transparency"] == 4242
    expected = _grey_rgb(np.rint(grey / 257).astype(np.uint8))
    expected[grey == 4242] = BACKGROUND
    _close(decode_resize(data, 48), expected, 0)
    alpha = np.where(np.arange(48) < 24, 0, 65535).astype(np.uint16)[None, :].repeat(48, axis=0)
    with_alpha = _png16(np.stack([grey, alpha], axis=2), 4)  # 16-bit grey + 16-bit alpha
    expected = _grey_rgb(np.rint(grey / 257).astype(np.uint8))
    expected[:, :24] = BACKGROUND
    _close(decode_resize(with_alpha, 48), expected, 1)  # Pillow keeps the high byte: within a level


def _tiff_of(mode: str, samples: np.ndarray) -> bytes:
    if mode == "I;16B":
        img = Image.frombytes("I;16B", samples.shape[::-1], samples.astype(">u2").tobytes())
    else:
        img = Image.fromarray(samples)
    data = _encode(img, "TIFF")
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.mode == mode
    return data


@pytest.mark.parametrize(
    "mode, samples_of, white",
    [
        ("I;16B", lambda s: s, 65535),  # big-endian 16-bit
        ("I", lambda s: s.astype(np.int32), 65535),  # 32-bit int holding 16-bit data
        ("I", lambda s: (s >> 8).astype(np.int32), 255),  # 32-bit int holding 8-bit data
        ("F", lambda s: (s / 65535).astype(np.float32), 1.0),  # float, 0..1
    ],
)
def test_high_bit_depth_tiffs_scale_by_their_full_scale(mode, samples_of, white):
    samples = samples_of(_to_16bit(_grey_face(), np.random.default_rng(2)))
    expected = np.rint(samples.astype(np.float64) * 255 / white).astype(np.uint8)
    _close(decode_resize(_tiff_of(mode, samples), 48), _grey_rgb(expected), 0)


def test_a_32_bit_image_beyond_16_bits_maps_its_own_range():
    samples = _grey_face().astype(np.int32) * 1000 - 100_000  # negative and past 65535: no standard scale
    low, high = samples.min(), samples.max()
    expected = np.rint((samples - low) * 255 / (high - low)).astype(np.uint8)
    _close(decode_resize(_tiff_of("I", samples), 48), _grey_rgb(expected), 1)  # float32 rounding: ties may differ


def test_a_float_image_with_nan_is_refused():
    samples = (_grey_face() / 255).astype(np.float32)
    samples[3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        decode_rgb(_tiff_of("F", samples))


def test_48_and_64_bit_pngs_decode_to_their_high_bytes():
    rng = np.random.default_rng(3)
    rgb = _to_16bit(_rgb_face(), rng)
    with Image.open(io.BytesIO(_png16(rgb, 2))) as img:
        assert img.mode == "RGB"  # Pillow reads 48-bit PNGs to 8 bits itself (the high byte of each sample)
    _close(decode_resize(_png16(rgb, 2), 48), np.rint(rgb / 257).astype(np.uint8), 1)
    alpha = np.full((48, 48, 1), 65535, np.uint16)
    alpha[:, :24] = 0  # the left half transparent: the background shows there
    decoded = decode_resize(_png16(np.concatenate([rgb, alpha], axis=2), 6), 48)
    _close(decoded[:, 24:], np.rint(rgb[:, 24:] / 257).astype(np.uint8), 1)
    assert (decoded[:, :24] == BACKGROUND).all()


def test_the_phash_of_a_16_bit_image_is_that_of_its_8_bit_twin():
    grey, rgb = _grey_face(4), _rgb_face(4)
    assert phash_of_bytes(_encode(Image.fromarray(grey.astype(np.uint16) * 257), "PNG")) == phash_of_bytes(
        _encode(Image.fromarray(grey), "PNG")
    )
    assert phash_of_bytes(_png16(rgb.astype(np.uint16) * 257, 2)) == phash_of_bytes(
        _encode(Image.fromarray(rgb), "PNG")
    )
    # and the hash sees the decode: a face and its white-clipped ghost (the old decode) hash apart
    assert phash_of_bytes(_encode(Image.fromarray(grey), "PNG")) != phash_of_bytes(
        _encode(Image.fromarray(np.full_like(grey, 255)), "PNG")
    )


# --- orientation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "orientation, stored_as",
    [(3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270)],
)
def test_exif_orientation_is_applied(orientation, stored_as):
    # Not square, so a quarter turn shows in the size; blurred, so JPEG's loss is small beside a wrong turn.
    upright = make_face("female", np.random.default_rng(5), 160).resize((160, 224)).filter(ImageFilter.GaussianBlur(3))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(upright.transpose(stored_as), "JPEG", quality=95, subsampling=0, exif=exif.tobytes())
    with Image.open(io.BytesIO(data)) as img:
        reference = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    decoded = np.asarray(decode_rgb(data))
    _close(decoded, reference, 0)
    assert np.abs(decoded.astype(int) - np.asarray(upright)).mean() < 3  # upright, within JPEG's loss
    # At a small target size the JPEG decodes in draft mode (a quarter scale here), still upright.
    small = decode_rgb(data, 32)
    assert small.size == (40, 56)
    expected = np.asarray(upright.resize((32, 32), Image.Resampling.BILINEAR, reducing_gap=2.0))
    assert np.abs(decode_resize(data, 32).astype(int) - expected).mean() < 6


# --- colour modes and transparency ---------------------------------------------------------------


def test_a_cmyk_jpeg_decodes_like_pillows_reference():
    face = make_face("male", np.random.default_rng(6), 48)
    data = _encode(face.convert("CMYK"), "JPEG", quality=95)
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode == "CMYK" and img.info.get("adobe")  # Adobe's inverted CMYK, un-inverted by Pillow
        reference = np.asarray(img.convert("RGB"))
    decoded = decode_resize(data, 48)
    _close(decoded, reference, 0)
    assert np.abs(decoded.astype(int) - np.asarray(face)).mean() < 4


def test_palette_pngs_decode_with_and_without_transparency():
    face = make_face("female", np.random.default_rng(7), 48).convert("P", palette=Image.Palette.ADAPTIVE)
    _close(decode_resize(_encode(face, "PNG"), 48), np.asarray(face.convert("RGB")), 0)
    index = np.asarray(face)
    transparent = int(index[0, 0])
    data = _encode(face, "PNG", transparency=transparent)
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode == "P" and img.info["transparency"] == transparent
    expected = np.where(
        (index == transparent)[..., None], np.array(BACKGROUND, np.uint8), np.asarray(face.convert("RGB"))
    )
    _close(decode_resize(data, 48), expected, 0)
    assert (index == transparent).sum() > 0 and (index != transparent).sum() > 0


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_over_the_background(mode):
    rgb = _rgb_face(8) if mode == "RGBA" else _grey_rgb(_grey_face(8))
    alpha = np.tile(np.linspace(0, 255, 48).round().astype(np.uint8), (48, 1))  # transparent left, opaque right
    colour = rgb if mode == "RGBA" else rgb[..., :1]
    img = Image.fromarray(np.concatenate([colour, alpha[..., None]], axis=2))
    assert img.mode == mode
    weight = alpha[..., None] / 255
    expected = np.rint(rgb * weight + np.array(BACKGROUND) * (1 - weight)).astype(np.uint8)
    _close(decode_resize(_encode(img, "PNG"), 48), expected, 1)


@pytest.mark.parametrize("mode", ["1", "L"])
def test_bilevel_and_grey_images_decode_like_pillow(mode):
    img = make_face("male", np.random.default_rng(9), 48).convert(mode)
    _close(decode_resize(_encode(img, "PNG"), 48), np.asarray(img.convert("RGB")), 0)


# --- ingest refuses blank images -----------------------------------------------------------------


def test_ingest_refuses_near_blank_images_naming_them_and_writes_nothing(tmp_path, local_storage):
    source = write_dataset(tmp_path / "faces", 6)
    rng = np.random.default_rng(10)
    noisy_white = np.clip(255 - rng.integers(0, 3, (48, 48, 3)), 0, 255).astype(np.uint8)  # std ~0.8 levels
    Image.fromarray(noisy_white).save(source / "female" / "blank.png")
    clear = np.zeros((48, 48, 4), np.uint8)
    clear[..., :3] = _rgb_face(10)  # a face, but wholly transparent: the background is all that shows
    Image.fromarray(clear).save(source / "male" / "invisible.png")
    with pytest.raises(IngestError) as refused:
        ingest_folder(source, local_storage)
    message = str(refused.value)
    assert "2 file(s) refused, nothing was written" in message
    assert (
        "female/blank.png is a (nearly) blank image" in message and "male/invisible.png is a (nearly) blank" in message
    )
    assert "RGB(255, 255, 255)" in message and "it holds no face; remove or replace it" in message
    assert [p for p in local_storage.root.rglob("*") if p.is_file()] == []


def test_a_low_contrast_face_is_not_blank_but_a_flat_one_is(tmp_path):
    """The threshold sits between a face at a tenth of its contrast and a flat field with noise."""
    source = write_dataset(tmp_path / "faces", 6)
    face = _rgb_face(11).astype(np.float64)
    dim = np.rint(128 + (face - face.mean()) * 0.1).astype(np.uint8)
    assert dim.reshape(-1, 3).std(axis=0).max() > 2 * BLANK_STD_LEVELS
    Image.fromarray(dim).save(source / "female" / "dim.png")
    assert len(scan_folder(source)) == 13
    flat = np.rint(128 + (face - face.mean()) * 0.02).astype(np.uint8)
    assert flat.reshape(-1, 3).std(axis=0).max() < BLANK_STD_LEVELS
    Image.fromarray(flat).save(source / "female" / "flat.png")
    with pytest.raises(IngestError, match=r"female/flat\.png is a \(nearly\) blank image"):
        scan_folder(source)


# --- a 16-bit dataset through the pipeline ---------------------------------------------------------


def _write_faces(root: Path, bits: int) -> Path:
    """write_dataset's faces (greyscale), saved as 8-bit or 16-bit PNGs (the 8-bit value * 257)."""
    rng = np.random.default_rng(0)
    for label in ("female", "male"):
        (root / label).mkdir(parents=True)
        for i in range(20):
            grey = np.asarray(make_face(label, rng).convert("L"))
            pixels = grey.astype(np.uint16) * 257 if bits == 16 else grey
            Image.fromarray(pixels).save(root / label / f"{label}_{i:04d}.png")
    return root


def _prepared(tmp_path: Path, bits: int) -> dict:
    source = _write_faces(tmp_path / f"faces{bits}", bits)
    run = pipeline.prepare({"source": str(source), "storage": str(tmp_path / f"store{bits}"), "profile": "tiny",
                            "models": ["cnn"], "epochs": 1, "label_audit": False})  # fmt: skip
    return pipeline.preprocess(pipeline.split(pipeline.ingest(run)))


def _cache(run: dict) -> np.ndarray:
    storage = open_storage(run["storage"])
    (prefix,) = run["caches"]["cache_prefixes"]
    return shards.ShardReader(storage, prefix).take(np.arange(run["dataset"]["images"]))


def _manifest(run: dict) -> pd.DataFrame:
    return read_manifest(open_storage(run["storage"]), layout.manifest_key(run["dataset"]["dataset_id"]))


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(shards.CACHE_DIR_ENV, str(tmp_path / "local-cache"))


def test_a_16_bit_dataset_caches_the_pixels_its_8_bit_twin_does(tmp_path, cache_dir):
    run16, run8 = _prepared(tmp_path, 16), _prepared(tmp_path, 8)
    counts = run16["split"]["counts"]
    assert all(counts[split][label] > 0 for split in ("train", "val", "test") for label in ("female", "male"))
    cached16, cached8 = _cache(run16), _cache(run8)  # both in sha256 order: their own images' hashes
    manifest16, manifest8 = _manifest(run16), _manifest(run8)
    order16 = manifest16.sort_values("sha256")["source_path"].tolist()
    order8 = manifest8.sort_values("sha256")["source_path"].tolist()
    cached8 = cached8[[order8.index(path) for path in order16]]  # row for row, the same face
    assert cached16.reshape(len(cached16), -1).std(axis=1).min() > 5  # faces (about 11 here), not constant (0)
    _close(cached16, cached8, 1)
    assert sorted(manifest16["phash"]) == sorted(manifest8["phash"])


@pytest.mark.slow
def test_a_16_bit_dataset_trains_and_reports(tmp_path, cache_dir):
    run = pipeline.validate(_prepared(tmp_path, 16))
    assert run["validation"]["success"]
    trained = pipeline.train(run, "cnn")
    assert trained["test_accuracy"] is not None  # the test split holds images: distinct faces, distinct hashes
    report = pipeline.report(run, [trained])  # crashed on the test split's missing metrics when all were blank
    assert open_storage(run["storage"]).exists(run["report_key"])
    assert report["test_accuracy"]["cnn"] == trained["test_accuracy"]


# --- a decode change reaches the caches and the model keys ----------------------------------------


def test_an_outdated_cache_is_refused_by_readers_and_rebuilt_by_writers(local_storage, tmp_path):
    data = _encode(make_face("male", np.random.default_rng(12), 40), "JPEG")
    local_storage.put_bytes("images/a.jpg", data)
    sha, prefix = hashlib.sha256(data).hexdigest(), "datasets/x/cache/16px"
    index = shards.write_shards(local_storage, prefix, [sha], ["images/a.jpg"], 16, workers=0)
    assert index["format"] == shards.INDEX_FORMAT and "decode" in index
    old = {**index, "format": 1}
    del old["decode"]  # what the old decode wrote
    local_storage.put_bytes(shards.index_key(prefix), json.dumps(old).encode())
    local_storage.delete(shards.index_key(prefix) + ".sha256")  # the old version recorded no checksum
    local_storage.put_bytes(shards.shard_key(prefix, 0), b"old decode's pixels")
    with pytest.raises(shards.CacheOutdated, match=r"index format 1, decode None.*run the preprocess step to rebuild"):
        shards.ShardReader(local_storage, prefix, cache_dir=tmp_path / "cache")
    rebuilt = shards.write_shards(local_storage, prefix, [sha], ["images/a.jpg"], 16, workers=0)
    assert rebuilt == index
    reader = shards.ShardReader(local_storage, prefix, cache_dir=tmp_path / "cache")
    assert np.array_equal(reader.take([0])[0], decode_resize(data, 16))


@pytest.fixture
def fresh_code_version():
    keys.code_version.cache_clear()
    yield keys.code_version
    keys.code_version.cache_clear()


def test_the_decode_and_the_cache_code_are_in_the_model_keys(tmp_path, monkeypatch, fresh_code_version):
    assert {"data/images.py", "data/shards.py"} <= set(keys.CODE_SOURCES)
    copy = tmp_path / "gender_tasks"
    shutil.copytree(keys._ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(keys, "_ROOT", copy)
    versions = [fresh_code_version()]
    for name in ("data/images.py", "data/shards.py"):
        with (copy / name).open("a") as fh:
            fh.write("\n# a change\n")
        fresh_code_version.cache_clear()
        versions.append(fresh_code_version())
    assert len(set(versions)) == 3
