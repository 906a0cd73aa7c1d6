"""Textual-inversion files: every layout A1111 reads (fileinfo), the registry's listing, the engine's cache."""
from __future__ import annotations

import pickle

import pytest
import torch

from diffusionapi.config import Settings
from diffusionapi.engine.embeddings import EmbeddingTensors
from diffusionapi.fileinfo import EmbeddingError, read_embedding
from diffusionapi.registry import Registry


def listing(directory):
    return Registry(Settings(embeddings_dir=directory)).embeddings()


def write_embedding(path, layout: str, *, vectors: int = 2, width: int = 32, width_g: int = 40, seed: int = 0):
    """A tiny embedding file in one of the layouts found in the wild; returns its tensors."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    vec = torch.randn(vectors, width, generator=g)
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout == "a1111-pt":
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": path.stem,
                    "step": 100, "sd_checkpoint": None, "sd_checkpoint_name": None}, str(path))
    elif layout == "kohya-safetensors":
        save_file({"emb_params": vec}, str(path))
    elif layout == "diffusers-bin":
        vec = vec[:1]
        torch.save({f"<{path.stem}>": vec[0]}, str(path))
    elif layout == "sdxl":
        vg = torch.randn(vectors, width_g, generator=g)
        save_file({"clip_l": vec, "clip_g": vg}, str(path))
        return {"clip_l": vec, "clip_g": vg}
    else:
        raise ValueError(layout)
    return {"": vec}


@pytest.mark.parametrize("layout, suffix, family, count", [
    ("a1111-pt", ".pt", "sd15", 3), ("kohya-safetensors", ".safetensors", "sd15", 3),
    ("diffusers-bin", ".bin", "sd15", 1), ("sdxl", ".safetensors", "sdxl", 3)])
def test_layouts(tmp_path, layout, suffix, family, count):
    written = write_embedding(tmp_path / f"emb{suffix}", layout, vectors=3)
    got = read_embedding(tmp_path / f"emb{suffix}")
    assert set(got) == set(written)
    for k in got:
        assert torch.equal(got[k], written[k])
    [entry] = listing(tmp_path)
    assert (entry.name, entry.family, entry.vectors, entry.error) == ("emb", family, count, None)


def test_listing_subfolders_duplicates_and_bad_files(tmp_path):
    write_embedding(tmp_path / "a.pt", "a1111-pt")
    write_embedding(tmp_path / "sub" / "b.safetensors", "sdxl")
    write_embedding(tmp_path / "sub" / "a.safetensors", "kohya-safetensors")  # same name: first one wins
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    good = (tmp_path / "a.pt").read_bytes()
    (tmp_path / "torn.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(print))  # needs more than tensors: refused
    torch.save({"x": torch.zeros(2, 4), "y": torch.zeros(2, 4)}, str(tmp_path / "two.pt"))
    items = {e.name: e for e in listing(tmp_path)}
    tensors = EmbeddingTensors()
    assert set(items) == {"a", "b", "torn", "evil", "two"}
    assert items["a"].path.name == "a.pt" and items["b"].family == "sdxl"
    for bad in ("torn", "evil", "two"):
        assert items[bad].family is None and items[bad].error
        assert tensors.load(items[bad]) == (None, items[bad].error)
    assert torch.equal(tensors.load(items["a"])[0][""], read_embedding(tmp_path / "a.pt")[""])
    assert "neither" in items["two"].error


def test_a_changed_file_is_read_again(tmp_path):
    path = tmp_path / "e.safetensors"
    write_embedding(path, "kohya-safetensors", vectors=1)
    registry = Registry(Settings(embeddings_dir=tmp_path))
    assert registry.embeddings()[0].vectors == 1
    tensors = EmbeddingTensors()
    assert tensors.load(registry.embeddings()[0])[0][""].shape[0] == 1
    import os
    import time

    write_embedding(path, "kohya-safetensors", vectors=4)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert registry.embeddings()[0].vectors == 4
    assert tensors.load(registry.embeddings()[0])[0][""].shape[0] == 4


def test_missing_directory_lists_nothing(tmp_path):
    assert listing(tmp_path / "nope") == []


def test_mismatched_sdxl_vectors(tmp_path):
    from safetensors.torch import save_file

    save_file({"clip_l": torch.zeros(2, 32), "clip_g": torch.zeros(3, 40)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(EmbeddingError, match="different numbers"):
        read_embedding(tmp_path / "x.safetensors")
