"""Helpers that tests import (`from helpers import write_dataset`): generated face images and files, an
AWS-free environment, the pieces the hostile-source tests share, and copies of a prepared run. Fixtures live in conftest.py, which nothing imports.

`tests/` is on sys.path through pytest's `pythonpath` setting (pyproject.toml), so this module imports the
same way under plain pytest and under pytest-xdist's workers.
"""

from __future__ import annotations

import json
import shutil
import socket
import struct
import zipfile
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def make_face(label: str, rng, size: int = 48):
    """A synthetic 'face': the class shows in the colour and shape, noise makes every image unique."""
    import numpy as np
    from PIL import Image, ImageDraw

    base = np.clip(rng.normal(120, 40, (size, size, 3)), 0, 255).astype("uint8")
    img = Image.fromarray(base)
    draw = ImageDraw.Draw(img)
    m = size // 4
    if label == "female":
        draw.ellipse([m, m, size - m, size - m], fill=(230, 90, 120))
    else:
        draw.rectangle([m, m, size - m, size - m], fill=(60, 110, 220))
    return img


def write_dataset(root: Path, n_per_class: dict | int = 20, *, size: int = 48, folder_names=None, seed: int = 0,
                  fmt: str = "JPEG") -> Path:  # fmt: skip
    import numpy as np

    rng = np.random.default_rng(seed)
    counts = n_per_class if isinstance(n_per_class, dict) else {"female": n_per_class, "male": n_per_class}
    names = folder_names or {"female": "female", "male": "male"}
    suffix = ".jpg" if fmt == "JPEG" else ".png"
    for label, n in counts.items():
        folder = root / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            make_face(label, rng, size).save(folder / f"{label}_{i:04d}{suffix}", fmt)
    return root


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width` x `height` px: what a decompression bomb looks like to open()."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# --- hostile and faulty sources (test_hostile_sources.py, test_source_faults.py) ----------------------

PER_CLASS = 8  # faces per class of a valid dataset: enough for the 70/15/15 split
SENTINEL = "sentinel/already-here.txt"  # an object stored before the run: a refused run leaves it alone


def listing(storage) -> list[str]:
    """Every object (and temporary file) in the storage: the whole folder, or the whole bucket."""
    from gender_tasks.storage import LocalStorage

    if isinstance(storage, LocalStorage):
        return sorted(p.relative_to(storage.root).as_posix() for p in storage.root.rglob("*") if not p.is_dir())
    pages = storage.client.get_paginator("list_objects_v2").paginate(Bucket=storage.bucket)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def one_image(root: Path) -> bytes:
    return (root / "female" / "female_0001.jpg").read_bytes()


def zip_of(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(folder).as_posix())
    return archive


def isolate_aws_env(monkeypatch, tmp_path) -> None:
    """No AWS configuration from this machine leaks into a test: no ~/.aws files, profile, instance metadata."""
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for var in ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
                "AWS_ENDPOINT_URL_S3", "AWS_MAX_ATTEMPTS", "GENDER_S3_CONN_ID"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound once by the OS, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_prepared(base: Path, record, dest: Path):
    """A private copy of a run prepared once under `base` (its source folder, storage, caches): the folder
    copied to `dest` (timestamps kept) and every path in `record` (a JSON-safe run record, or a list or
    tuple of them) moved with it. Module-scoped fixtures do the expensive preparing once; each test gets a
    copy it may change, so no test sees what another trained, reused or spoiled."""
    shutil.copytree(base, dest, symlinks=True)
    text = json.dumps(record)
    for old, new in ((base.resolve(), dest.resolve()), (base, dest)):
        text = text.replace(str(old), str(new))
    return json.loads(text)
