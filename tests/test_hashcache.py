"""The source hash cache: reuse while a file is unchanged, re-hash after any change."""

from __future__ import annotations

import hashlib
import json
import os
import time

import pytest

from lorakit import hashcache
from lorakit.hashcache import CACHE_ENV, CACHE_NAME, HashCache


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fail_if_hashed(path):
    raise AssertionError(f"{path} was hashed again")


@pytest.fixture()
def no_racy_window(monkeypatch):
    monkeypatch.setattr(hashcache, "RACY_NS", 0)


def test_hash_cache_reuses_unchanged_file(tmp_path, monkeypatch, no_racy_window):
    source = tmp_path / "weights.bin"
    source.write_bytes(b"first")
    cache = HashCache(tmp_path / "cache")
    assert cache.sha256(source) == digest(b"first")
    cache.save()

    monkeypatch.setattr(hashcache, "file_sha256", fail_if_hashed)
    assert HashCache(tmp_path / "cache").sha256(source) == digest(b"first")


def test_hash_cache_rehashes_changed_file(tmp_path, no_racy_window):
    source = tmp_path / "weights.bin"
    source.write_bytes(b"first")
    cache = HashCache(tmp_path / "cache")
    cache.sha256(source)
    cache.save()

    # A later clock tick, and the old mtime put back (as ``touch -r`` would): only ctime shows the change.
    before = source.stat()
    time.sleep(0.05)
    source.write_bytes(b"other")
    os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert source.stat().st_size == before.st_size
    assert HashCache(tmp_path / "cache").sha256(source) == digest(b"other")


def test_hash_cache_skips_recent_file(tmp_path):
    source = tmp_path / "weights.bin"
    source.write_bytes(b"just written")
    cache = HashCache(tmp_path / "cache")

    assert cache.sha256(source) == digest(b"just written")
    cache.save()
    assert not (tmp_path / "cache" / CACHE_NAME).exists()


def test_hash_cache_ignores_corrupt_file(tmp_path, no_racy_window):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / CACHE_NAME).write_text('{"broken": ')
    source = tmp_path / "weights.bin"
    source.write_bytes(b"data")
    cache = HashCache(tmp_path / "cache")

    assert cache.sha256(source) == digest(b"data")
    cache.save()
    entries = json.loads((tmp_path / "cache" / CACHE_NAME).read_text())
    assert entries[str(source.resolve())]["sha256"] == digest(b"data")


def test_hash_cache_ignores_malformed_entry(tmp_path, no_racy_window):
    source = tmp_path / "weights.bin"
    source.write_bytes(b"data")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / CACHE_NAME).write_text(json.dumps({str(source.resolve()): ["not", "an", "entry"]}))

    assert HashCache(tmp_path / "cache").sha256(source) == digest(b"data")


def test_hash_cache_disabled_by_empty_variable(tmp_path, monkeypatch, no_racy_window):
    monkeypatch.setenv(CACHE_ENV, "")
    cache = HashCache.default()
    source = tmp_path / "weights.bin"
    source.write_bytes(b"data")

    assert cache.folder is None
    assert cache.sha256(source) == digest(b"data")
    cache.save()
    assert list(tmp_path.iterdir()) == [source]


def test_hash_cache_folder_from_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert HashCache.default().folder == tmp_path / "lorakit"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "own"))
    assert HashCache.default().folder == tmp_path / "own"
