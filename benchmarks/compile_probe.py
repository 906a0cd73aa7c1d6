#!/usr/bin/env python3
"""One process that compiles a UNet the way fast mode does (engine/fastmode.compile_unet), with the
compile cache in ``--cache-dir``, runs it at each ``--batches`` size and prints one JSON line: the
seconds of the first call (compile included), the graphs dynamo compiled, and inductor's FX graph
cache hits and misses. Two runs with the same cache dir show what the disk cache saves at a restart.

    python benchmarks/compile_probe.py --cache-dir /tmp/cc --tiny --device cpu --batches 2,4
    python benchmarks/compile_probe.py --cache-dir /tmp/cc --family sd15 --device cuda --size 512

tests/test_compile_cache.py and benchmarks/gpu.py (section "compile_cache") run it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def micro_unet():
    """The smallest UNet2DConditionModel with every part fast mode compiles (conv_in, a down and an
    up block with cross-attention, conv_out): seconds of inductor work on a CPU, not minutes."""
    from diffusers import UNet2DConditionModel

    import torch

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8,),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",),
                                up_block_types=("CrossAttnUpBlock2D",), mid_block_type=None,
                                cross_attention_dim=8, norm_num_groups=4, attention_head_dim=2)


def full_unet(family: str):
    """The full-size UNet of ``family`` (sd15, sdxl) from the shipped config, random weights."""
    from diffusers import UNet2DConditionModel

    import torch

    from diffusionapi.engine.checkpoints import packaged_config

    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(json.loads((packaged_config(family) / "unet" / "config.json").read_text()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache-dir", required=True)
    ap.add_argument("--tiny", action="store_true", help="the micro UNet (tests, CPU)")
    ap.add_argument("--family", default="sd15")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=64, help="image size in pixels (latents are size/8)")
    ap.add_argument("--batches", default="2", help="batch sizes to run, in order, e.g. 2,4")
    ap.add_argument("--mode", default="default")
    args = ap.parse_args(argv)

    import torch
    from torch._dynamo.utils import counters

    from diffusionapi.engine import fastmode

    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    unet = (micro_unet() if args.tiny else full_unet(args.family)).to(device, dtype).eval()
    t0 = time.perf_counter()
    compiled = fastmode.compile_unet(unet, args.mode, args.cache_dir)
    side = args.size // 8
    ctx_dim = unet.config.cross_attention_dim
    added = None
    if unet.config.addition_embed_type == "text_time":  # SDXL
        added = lambda b: {"text_embeds": torch.zeros(b, 1280, device=device, dtype=dtype),  # noqa: E731
                           "time_ids": torch.zeros(b, 6, device=device, dtype=dtype)}
    runs = []
    for b in [int(x) for x in args.batches.split(",") if x.strip()]:
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(b, unet.config.in_channels, side, side, generator=g).to(device, dtype)
        ctx = torch.randn(b, 77 if not args.tiny else 7, ctx_dim, generator=g).to(device, dtype)
        t = torch.full((b,), 500.0, device=device)
        start = time.perf_counter()
        with torch.inference_mode():
            kwargs = {"added_cond_kwargs": added(b)} if added else {}
            compiled(x, t, encoder_hidden_states=ctx, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        runs.append({"batch": b, "first_call_s": round(time.perf_counter() - start, 3),
                     "graphs_so_far": int(counters["stats"]["unique_graphs"])})
    inductor = counters["inductor"]
    print(json.dumps({"runs": runs, "total_s": round(time.perf_counter() - t0, 3),
                      "graphs": int(counters["stats"]["unique_graphs"]),
                      "fxgraph_cache_hit": int(inductor.get("fxgraph_cache_hit", 0)),
                      "fxgraph_cache_miss": int(inductor.get("fxgraph_cache_miss", 0)),
                      "torch": torch.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
