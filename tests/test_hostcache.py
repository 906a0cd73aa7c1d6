"""The host-RAM model cache (engine/hostcache.py) through a real server: with one model on the
device, switching A -> B -> A serves the second A from host RAM (no disk load) and makes the same
image, byte for byte, as A's disk load; its hits and misses show on /metrics."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from diffusionapi.engine.hostcache import HostCache, auto_capacity_gb, pipeline_bytes
from tests.conftest import LiveServer, make_settings

JOB = dict(prompt="a lighthouse", width=64, height=64, steps=3, seed=11, fileType="png")


def _pixels(done: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(done["image"]))))


def _metric(text: str, result: str) -> float:
    for line in text.splitlines():
        if line.startswith(f'diffusionapi_host_cache_total{{result="{result}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_switch_back_is_served_from_host_ram_with_the_same_image(model_store, tmp_path):
    settings = make_settings(model_store, tmp_path, pipeline_cache_size=1, host_cache_gb=1)
    with LiveServer(settings) as s:
        cache = s.engine.cache
        before = s.client.get("/metrics").text
        first = s.run(**JOB, model="tiny-sd15")
        assert first["state"] == "done" and cache.loads == 1
        s.run(**JOB, model="tiny-sdxl")
        assert cache.loads == 2 and cache.resident() == ["tiny-sdxl"] and cache.host.names() == ["tiny-sd15"]
        back = s.run(**JOB, model="tiny-sd15")
        assert back["state"] == "done"
        assert cache.loads == 2, "the second tiny-sd15 job read the model from disk again"
        assert cache.host.hits == 1 and cache.host.names() == ["tiny-sdxl"]
        assert np.array_equal(_pixels(back), _pixels(first))
        assert base64.b64decode(back["image"]) == base64.b64decode(first["image"])
        after = s.client.get("/metrics").text
        assert _metric(after, "hit") - _metric(before, "hit") == 1
        assert _metric(after, "miss") - _metric(before, "miss") == 2  # the two first loads


def test_host_cache_off_reloads_from_disk(model_store, tmp_path):
    """The control: with no host cache the same switch is a third disk load, and the image is the same."""
    settings = make_settings(model_store, tmp_path, pipeline_cache_size=1, host_cache_gb=0)
    with LiveServer(settings) as s:
        first = s.run(**JOB, model="tiny-sd15")
        s.run(**JOB, model="tiny-sdxl")
        back = s.run(**JOB, model="tiny-sd15")
        assert s.engine.cache.loads == 3 and s.engine.cache.host.hits == 0
        assert np.array_equal(_pixels(back), _pixels(first))


class _Entry:
    def __init__(self, name, path):
        self.name, self.path = name, path


class _Loaded:
    borrowed_from = None

    def __init__(self, name, pipe):
        self.entry, self.pipe = _Entry(name, f"/m/{name}"), pipe


def _pipe(n_floats: int):
    class Pipe:
        components = {"unet": torch.nn.Linear(n_floats, 1, bias=False)}
    return Pipe()


def test_lru_by_size_and_path_change():
    size = pipeline_bytes(_pipe(1000))
    assert size == 4000
    host = HostCache(int(size * 2.5), torch.device("cpu"))
    for name in ("a", "b", "c"):
        assert host.put(name, _Loaded(name, _pipe(1000)))
    assert host.names() == ["b", "c"]  # a was oldest: dropped to fit c
    assert not host.put("big", _Loaded("big", _pipe(3000)))  # larger than the whole cache
    assert host.take("b", "/m/other") is None and host.names() == ["c"]  # another file under that name
    assert host.take("c", "/m/c") is not None and host.hits == 1 and host.misses == 1
    off = HostCache(0, torch.device("cpu"))
    assert not off.put("a", _Loaded("a", _pipe(10))) and off.take("a", "/m/a") is None and off.misses == 0


@pytest.mark.parametrize("cuda", [False, True])
def test_auto_capacity(cuda):
    gb = auto_capacity_gb(cuda)
    assert gb == 0 if not cuda else 0 < gb <= 64
