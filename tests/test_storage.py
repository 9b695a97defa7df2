import pytest

from gender_tasks.storage import LocalStorage, StorageError, open_storage


def test_local_roundtrip_list_and_exists(local_storage):
    local_storage.put_bytes("a/b/c.txt", b"hello")
    local_storage.put_bytes("a/d.txt", b"x")
    assert local_storage.get_bytes("a/b/c.txt") == b"hello"
    assert local_storage.exists("a/d.txt") and not local_storage.exists("a/zzz")
    assert local_storage.list("a/") == ["a/b/c.txt", "a/d.txt"]


def test_local_write_is_atomic_and_leaves_no_temp_files(local_storage, monkeypatch):
    local_storage.put_bytes("k.bin", b"old")

    class Boom(Exception):
        pass

    import os

    def fail_replace(*a, **k):
        raise Boom()

    monkeypatch.setattr(os, "replace", fail_replace)
    with pytest.raises(Boom):
        local_storage.put_bytes("k.bin", b"new")
    monkeypatch.undo()
    assert local_storage.get_bytes("k.bin") == b"old"
    assert [p.name for p in local_storage.root.iterdir()] == ["k.bin"]


@pytest.mark.parametrize("key", ["../escape", "/abs", "a//b", "a/./b", ""])
def test_keys_cannot_escape(local_storage, key):
    with pytest.raises(StorageError, match="invalid storage key"):
        local_storage.put_bytes(key, b"x")


def test_open_storage_selects_backend(tmp_path):
    assert isinstance(open_storage(str(tmp_path / "s")), LocalStorage)
    assert isinstance(open_storage((tmp_path / "t").as_uri()), LocalStorage)
    with pytest.raises(StorageError, match="unsupported"):
        open_storage("ftp://host/x")


def test_missing_object_names_it(local_storage):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        local_storage.get_bytes("nope.txt")
