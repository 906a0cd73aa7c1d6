"""fileinfo.py: looks into files without loading pipelines."""
from __future__ import annotations

import threading

import torch

from diffusionapi.fileinfo import load_upscaler_descriptor
from tests.tiny_files import write_tiny_upscaler


def test_an_upscaler_checked_while_a_pipeline_loads_gets_its_real_weights(tmp_path):
    """diffusers builds pipelines inside accelerate's init_empty_weights, which patches torch for
    the whole process: a submit that checks an upscaler file meanwhile must not get meta weights."""
    from accelerate import init_empty_weights

    path = write_tiny_upscaler(tmp_path / "up.pth")
    expected = load_upscaler_descriptor(path)
    inside, leave = threading.Event(), threading.Event()

    def loading_a_pipeline():
        with init_empty_weights():
            inside.set()
            leave.wait(10)

    t = threading.Thread(target=loading_a_pipeline)
    t.start()
    assert inside.wait(10)
    threading.Timer(0.3, leave.set).start()
    desc = load_upscaler_descriptor(path)
    t.join()
    got = dict(desc.model.state_dict())
    assert all(v.device.type != "meta" for v in got.values())
    assert all(torch.equal(v, expected.model.state_dict()[k]) for k, v in got.items())
