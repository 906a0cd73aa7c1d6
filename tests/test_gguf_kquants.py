"""The test-side K-quant encoders (tests/gguf_kquants.py) against the `gguf` package's decoders:
blocks it reads back to the input within the type's rounding, at least as close as the legacy
type of the same width (the sub-block scale search at work), in llama.cpp's block sizes."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from .gguf_kquants import K_QUANTIZERS

# Worst row's RMS error / the row's RMS, measured on the rows below: Q2_K 0.318, Q3_K 0.162,
# Q4_K 0.099, Q5_K 0.049, Q6_K 0.034 (Q4_K..Q6_K: the outlier and heavy-tailed rows); medians
# 0.296, 0.152, 0.072, 0.036, 0.018 (Q4_1 0.078, Q5_1 0.038).
MAX_REL_RMS = {"Q2_K": 0.36, "Q3_K": 0.19, "Q4_K": 0.12, "Q5_K": 0.06, "Q6_K": 0.04}
SAME_WIDTH_LEGACY = {"Q4_K": "Q4_1", "Q5_K": "Q5_1", "Q6_K": "Q5_1"}


def rows() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 512)).astype(np.float32) * 0.05
    x[3] = 0  # all zero
    x[4] = 1.5  # constant
    x[5] = -np.abs(x[5])  # one-signed
    x[6] *= 0.05  # small (d and dmin are fp16: far smaller rows lose precision in any encoder)
    x[7] = rng.standard_t(2, 512) * 0.05  # heavy-tailed
    x[8, ::37] = 2.0  # outliers
    return x


def rel_rms(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.sqrt(np.mean((y - x) ** 2, axis=1)) / np.maximum(np.sqrt(np.mean(x ** 2, axis=1)), 1e-30)


@pytest.mark.parametrize("qtype", sorted(K_QUANTIZERS))
def test_k_quants_round_trip_through_the_gguf_decoder(qtype):
    kind = gguf.GGMLQuantizationType[qtype]
    block_size, type_size = gguf.GGML_QUANT_SIZES[kind]
    x = rows()
    q = K_QUANTIZERS[qtype](x)
    assert q.dtype == np.uint8 and q.shape == (64, 512 // block_size * type_size)
    y = gguf.quants.dequantize(q, kind)
    assert y.shape == x.shape
    err = rel_rms(y, x)
    assert err.max() < MAX_REL_RMS[qtype], err.max()
    assert not y[3].any()
    if qtype in SAME_WIDTH_LEGACY:
        legacy = gguf.GGMLQuantizationType[SAME_WIDTH_LEGACY[qtype]]
        legacy_err = rel_rms(gguf.quants.dequantize(gguf.quants.quantize(x, legacy), legacy), x)
        assert np.median(err) < np.median(legacy_err), (np.median(err), np.median(legacy_err))
    # 3-D input keeps its leading dimensions, as gguf.quants.quantize does.
    assert K_QUANTIZERS[qtype](x.reshape(4, 16, 512)).shape == (4, 16, 512 // block_size * type_size)


def test_more_bits_fit_closer():
    x = rows()
    medians = [np.median(rel_rms(gguf.quants.dequantize(K_QUANTIZERS[t](x), gguf.GGMLQuantizationType[t]), x))
               for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")]
    assert medians == sorted(medians, reverse=True) and medians[-1] > 0, medians


@pytest.mark.parametrize("qtype", sorted(K_QUANTIZERS))
def test_k_quants_refuse_rows_that_are_not_whole_super_blocks(qtype):
    with pytest.raises(ValueError, match="multiple of 256"):
        K_QUANTIZERS[qtype](np.zeros((2, 320), dtype=np.float32))
