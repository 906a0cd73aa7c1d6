"""Model and LoRA file digests (engine/hashes.py): computed once per file version, kept in one
cache per queue folder, shared by the engine, /sdapi's catalog and a Celery worker's catalog."""
from __future__ import annotations

import hashlib
import json

from diffusionapi.engine.hashes import FileHashes, hashes_in


def test_the_cache_is_written_even_when_its_folder_does_not_exist_yet(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"weights")
    cache = tmp_path / "queue" / ".file-hashes.json"  # a Celery worker has no queue folder of its own
    digest = FileHashes(cache).sha256(f)
    assert digest == hashlib.sha256(b"weights").hexdigest()
    assert list(json.loads(cache.read_text()).values()) == [digest]
    assert FileHashes(cache)._digests == json.loads(cache.read_text())  # a restart reads it back


def test_one_instance_per_queue_folder(tmp_path):
    assert hashes_in(tmp_path / "q") is hashes_in(tmp_path / "q")
    assert hashes_in(tmp_path / "q") is not hashes_in(tmp_path / "other")
