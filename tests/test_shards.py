"""The sharded image cache: round trip, memory-mapped reads, streaming == in-memory, partial caches refused."""

import hashlib
import io
import os

import numpy as np
import pytest
from helpers import make_face

from gender_tasks.data import shards
from gender_tasks.data.images import decode_resize
from gender_tasks.data.shards import (
    CacheIncomplete,
    ShardBatches,
    ShardReader,
    index_key,
    shard_key,
    write_shards,
)
from gender_tasks.errors import PermanentError

PREFIX = "datasets/test/cache/16px"
SIZE = 16


@pytest.fixture
def stored_images(local_storage):
    """30 generated JPEGs in storage: (shas, keys, the images decode_resize gives)."""
    rng = np.random.default_rng(0)
    shas, keys, expected = [], [], []
    for i in range(30):
        buf = io.BytesIO()
        make_face("female" if i % 2 else "male", rng, 40).save(buf, "JPEG")
        data = buf.getvalue()
        key = f"images/{i}.jpg"
        local_storage.put_bytes(key, data)
        shas.append(hashlib.sha256(data).hexdigest())
        keys.append(key)
        expected.append(decode_resize(data, SIZE))
    return shas, keys, np.stack(expected)


@pytest.fixture
def reader(local_storage, stored_images, tmp_path):
    shas, keys, _ = stored_images
    write_shards(local_storage, PREFIX, shas, keys, SIZE, rows_per_shard=7, workers=0)
    return ShardReader(local_storage, PREFIX, cache_dir=tmp_path / "cache")


def test_round_trip_gives_the_decoded_images_back(local_storage, stored_images, reader):
    shas, _, expected = stored_images
    assert len(reader) == 30 and reader.image_shape == (SIZE, SIZE, 3)
    assert np.array_equal(reader.take(np.arange(30)), expected)
    assert reader.index_of(shas[17]) == 17 and reader.indices_of([shas[3], shas[0]]).tolist() == [3, 0]
    stored = local_storage.list(PREFIX)
    # The index (the commit marker) has its sha256 recorded beside it.
    assert stored == sorted(
        [shard_key(PREFIX, n) for n in range(5)] + [index_key(PREFIX), index_key(PREFIX) + ".sha256"]
    )
    with pytest.raises(KeyError, match="not in the shard cache"):
        reader.index_of("0" * 64)


def test_rows_are_gathered_across_memory_mapped_shards(local_storage, stored_images, reader, tmp_path):
    _, _, expected = stored_images
    picked = np.array([29, 0, 8, 7, 6, 21, 8])
    assert np.array_equal(reader.take(picked), expected[picked])
    assert isinstance(reader._shard(0, keep_mapped=False), np.memmap)
    assert all(p.parent == tmp_path / "cache" / PREFIX for p in reader.paths)
    # Fetched once per machine: a second reader uses the local copies, not storage.
    for n in range(5):
        local_storage.delete(shard_key(PREFIX, n))
    again = ShardReader(local_storage, PREFIX, cache_dir=tmp_path / "cache")
    assert np.array_equal(again.take(picked), expected[picked])


def test_local_cache_folder_comes_from_the_environment(local_storage, stored_images, tmp_path, monkeypatch):
    shas, keys, _ = stored_images
    write_shards(local_storage, PREFIX, shas, keys, SIZE, rows_per_shard=16, workers=0)
    monkeypatch.setenv("GENDER_CACHE_DIR", str(tmp_path / "env-cache"))
    reader = ShardReader(local_storage, PREFIX)
    assert all(p.is_relative_to(tmp_path / "env-cache") for p in reader.paths)
    assert not list((tmp_path / "env-cache").rglob("*.part")), "temp downloads are renamed into place"


@pytest.mark.slow
def test_decoding_in_worker_processes_gives_the_same_shards(local_storage, stored_images, tmp_path, monkeypatch):
    shas, keys, expected = stored_images
    monkeypatch.setattr(shards, "MIN_IMAGES_FOR_PROCESSES", 0)
    monkeypatch.setattr(shards, "DECODE_CHUNK", 4)
    write_shards(local_storage, "parallel", shas, keys, SIZE, rows_per_shard=11, workers=2)
    assert np.array_equal(ShardReader(local_storage, "parallel", cache_dir=tmp_path / "c").take(range(30)), expected)


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_and_in_memory_give_the_same_batches(reader, workers):
    import torch

    from gender_tasks.training.batches import SplitData, StreamedSplit
    from gender_tasks.training.loop import epoch_generator

    rows = np.array([3, 29, 11, 0, 17, 8, 25, 14, 5, 20, 9])
    labels = torch.from_numpy((rows % 2).astype(np.float32))
    keys = [f"k{r}" for r in rows]
    in_memory = SplitData(torch.from_numpy(reader.take(rows)), labels, keys)
    streamed = StreamedSplit(reader, rows, labels, keys, workers)
    order = torch.randperm(len(rows), generator=epoch_generator(7, 1))
    pairs = list(zip(in_memory.batches(order, 4), streamed.batches(order, 4), strict=True))
    assert len(pairs) == 3
    for (xa, ya), (xb, yb) in pairs:
        assert xa.dtype == xb.dtype and np.array_equal(xa.numpy(), xb.numpy()) and np.array_equal(ya, yb)
    assert sorted(torch.cat([yb for _, (_, yb) in pairs]).tolist()) == sorted(labels.tolist())
    other_epoch = list(in_memory.batches(torch.randperm(len(rows), generator=epoch_generator(7, 2)), 4))
    assert not np.array_equal(other_epoch[0][0].numpy(), pairs[0][0][0].numpy())


def test_shard_batches_is_a_dataloader_dataset(reader, stored_images):
    from torch.utils.data import DataLoader

    _, _, expected = stored_images
    order = np.random.default_rng(1).permutation(30)
    dataset = ShardBatches(reader, np.arange(30), np.arange(30), [order[i : i + 8] for i in range(0, 30, 8)])
    batches = list(DataLoader(dataset, batch_size=None, num_workers=1))
    assert [len(y) for _, y in batches] == [8, 8, 8, 6]
    for x, y in batches:
        assert np.array_equal(x.numpy(), expected[y.numpy()])


def test_a_cache_without_its_index_is_not_used_and_is_rewritten(local_storage, stored_images, tmp_path):
    shas, keys, expected = stored_images
    write_shards(local_storage, PREFIX, shas, keys, SIZE, rows_per_shard=7, workers=0)
    local_storage.delete(index_key(PREFIX))  # as if the writer died before its last put
    with pytest.raises(CacheIncomplete, match="never completed.*run the preprocess step"):
        ShardReader(local_storage, PREFIX, cache_dir=tmp_path / "c")
    write_shards(local_storage, PREFIX, shas, keys, SIZE, rows_per_shard=7, workers=0)
    assert np.array_equal(ShardReader(local_storage, PREFIX, cache_dir=tmp_path / "c").take(range(30)), expected)


@pytest.mark.timeout(60)
def test_a_committed_cache_missing_a_shard_is_rebuilt_not_reused(local_storage, stored_images, tmp_path, caplog):
    # The index says the cache is complete, but a shard went since (deleted, or a FIFO put in its place): reused,
    # every training would fail on it, retry after retry. The writer rebuilds it from the stored images instead.
    shas, keys, expected = stored_images
    first = write_shards(local_storage, PREFIX, shas, keys, SIZE, rows_per_shard=7, workers=0)
    local_storage.delete(shard_key(PREFIX, 1))
    local_storage.delete(shard_key(PREFIX, 3))
    os.mkfifo(local_storage.local_path(shard_key(PREFIX, 3)))
    with caplog.at_level("WARNING", logger="gender_tasks.data.shards"):
        again = write_shards(local_storage, PREFIX, shas, keys, SIZE, rows_per_shard=7, workers=0)
    assert f"{PREFIX} lacks 2 of its 5 shards" in caplog.text and "rebuilding it" in caplog.text
    assert again == first  # the same images decoded the same way: the same shards, byte for byte
    assert np.array_equal(ShardReader(local_storage, PREFIX, cache_dir=tmp_path / "c").take(range(30)), expected)


def test_a_complete_cache_is_reused_and_other_images_are_refused(local_storage, stored_images):
    shas, keys, _ = stored_images
    first = write_shards(local_storage, PREFIX, shas, keys, SIZE, rows_per_shard=7, workers=0)
    local_storage.delete(keys[0])  # nothing is decoded again
    assert write_shards(local_storage, PREFIX, shas, keys, SIZE, rows_per_shard=7, workers=0) == first
    with pytest.raises(PermanentError, match="holds other images"):
        write_shards(local_storage, PREFIX, shas[:10], keys[:10], SIZE, workers=0)
    with pytest.raises(PermanentError, match=f"sha256 {shas[2]} is given twice"):
        write_shards(local_storage, "other", shas[:3] + shas[2:3], keys[:4], SIZE, workers=0)
