"""GGUF K-quant encoders (Q2_K .. Q6_K) in numpy, for writing test files: the `gguf` package
decodes these types but only encodes the legacy ones. Written from llama.cpp's reference encoders
(ggml-quants.c ``quantize_row_q2_K_ref`` .. ``q6_K_ref`` with their scale searches
``make_qkx2_quants``, ``make_q3_quants`` and ``make_qx_quants``) and its block layouts; each row
is a run of 256-value super-blocks, so a row's length must be a multiple of 256.

- Q2_K (84 bytes): 16 bytes of 4-bit sub-block scales and mins (sub-blocks of 16), 64 bytes of
  2-bit values, fp16 ``d``, fp16 ``dmin``; value = d * scale_j * q - dmin * min_j.
- Q3_K (110 bytes): 32 bytes of third bits, 64 bytes of low 2 bits, 12 bytes of 6-bit signed
  sub-block scales (sub-blocks of 16), fp16 ``d``; value = d * scale_j * (q - 4).
- Q4_K / Q5_K (144 / 176 bytes): fp16 ``d``, fp16 ``dmin``, 12 bytes of 6-bit sub-block scales and
  mins (8 sub-blocks of 32), [Q5_K: 32 bytes of fifth bits], 128 bytes of 4-bit values;
  value = d * scale_j * q - dmin * min_j.
- Q6_K (210 bytes): 128 bytes of low 4 bits, 64 bytes of high 2 bits, 16 int8 sub-block scales
  (sub-blocks of 16), fp16 ``d``; value = d * scale_j * (q - 32).
"""
from __future__ import annotations

import numpy as np

QK_K = 256
GROUP_MAX_EPS = 1e-15


def _rint(a: np.ndarray) -> np.ndarray:
    return np.rint(a).astype(np.int32)  # llama.cpp's nearest_int: round half to even


def _f16(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float32).astype(np.float16)


def _superblocks(data: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    data = np.asarray(data, dtype=np.float32)
    if data.shape[-1] % QK_K:
        raise ValueError(f"K-quants need rows a multiple of {QK_K} long, got {data.shape[-1]}")
    return data.reshape(-1, QK_K), data.shape


def _make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                      use_mad: bool = False):
    """Per row of ``x`` (sub-blocks): scale, min (subtracted, >= 0) and levels 0..nmax minimising
    the ``w``-weighted squared (``use_mad``: absolute) error over ``nstep`` + 1 trial inverse
    scales, each refit by weighted least squares (min clamped <= 0)."""
    def loss(d):
        return np.abs(d) if use_mad else d * d

    lo = np.minimum(x.min(axis=1, keepdims=True), 0)
    hi = x.max(axis=1, keepdims=True)
    flat = hi == lo
    sum_w = w.sum(axis=1, keepdims=True)
    sum_x = (w * x).sum(axis=1, keepdims=True)
    span = np.where(flat, 1, hi - lo)
    iscale = nmax / span
    scale = 1 / iscale
    levels = np.clip(_rint(iscale * (x - lo)), 0, nmax)
    best = (w * loss(scale * levels + lo - x)).sum(axis=1, keepdims=True)
    for step in range(nstep + 1):
        span = np.where(flat, 1, hi - lo)  # the reference reuses ``min`` as it improves
        iscale = (rmin + rdelta * step + nmax) / span
        trial = np.clip(_rint(iscale * (x - lo)), 0, nmax)
        sum_l = (w * trial).sum(axis=1, keepdims=True)
        sum_l2 = (w * trial * trial).sum(axis=1, keepdims=True)
        sum_xl = (w * trial * x).sum(axis=1, keepdims=True)
        det = sum_w * sum_l2 - sum_l * sum_l
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            positive = this_min > 0
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
        this_min = np.where(positive, 0, this_min)
        err = (w * loss(this_scale * trial + this_min - x)).sum(axis=1, keepdims=True)
        better = (det > 0) & (err < best) & ~flat
        levels = np.where(better, trial, levels)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale)
        lo = np.where(better, this_min, lo)
    scale = np.where(flat, 0, scale)
    levels = np.where(flat, 0, levels)
    return scale[:, 0].astype(np.float32), (-lo[:, 0]).astype(np.float32), levels


def _pack_scales_mins(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins per super-block -> the 12 bytes ``get_scale_min_k4`` reads."""
    ls, lm = ls.astype(np.uint8), lm.astype(np.uint8)
    out = np.empty((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return out


def _scale_min_levels(x: np.ndarray, nmax: int, rmin: float, nstep: int):
    """The shared part of Q4_K / Q5_K: sub-block scales and mins, quantized to 6 bits against
    the fp16 super-block ``d`` / ``dmin``, then each value's level against the quantized ones."""
    nb = x.shape[0]
    sub = x.reshape(nb * 8, 32)
    weights = np.sqrt(np.mean(sub * sub, axis=1, keepdims=True)) + np.abs(sub)
    scales, mins, levels = _make_qkx2_quants(sub, weights, nmax, rmin, 0.1, nstep)
    scales, mins, levels = scales.reshape(nb, 8), mins.reshape(nb, 8), levels.reshape(nb, 8, 32)
    max_scale, max_min = scales.max(axis=1, keepdims=True), mins.max(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, 63 / max_scale, 0)
        inv_min = np.where(max_min > 0, 63 / max_min, 0)
    ls = np.minimum(63, _rint(inv_scale * scales))
    lm = np.minimum(63, _rint(inv_min * mins))
    d, dmin = _f16(max_scale / 63), _f16(max_min / 63)
    sub_d = (d.astype(np.float32) * ls)[..., None]
    sub_m = (dmin.astype(np.float32) * lm)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_rint((x.reshape(nb, 8, 32) + sub_m) / sub_d), 0, nmax)
    levels = np.where(sub_d != 0, requant, levels).astype(np.uint8)  # d == 0: the search's levels stay
    head = np.concatenate([d.view(np.uint8).reshape(nb, 2), dmin.view(np.uint8).reshape(nb, 2),
                           _pack_scales_mins(ls, lm)], axis=1)
    return head, levels


def _low_nibbles(levels: np.ndarray) -> np.ndarray:
    """(nb, 8, 32) levels -> 128 bytes: sub-block 2c in the low nibble, 2c + 1 in the high one."""
    pairs = (levels & 0x0F).reshape(levels.shape[0], 4, 2, 32)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(levels.shape[0], 128)


def quantize_q4_k(data: np.ndarray) -> np.ndarray:
    x, shape = _superblocks(data)
    head, levels = _scale_min_levels(x, 15, -1.0, 20)
    return np.concatenate([head, _low_nibbles(levels)], axis=1).reshape(*shape[:-1], -1)


def quantize_q5_k(data: np.ndarray) -> np.ndarray:
    x, shape = _superblocks(data)
    head, levels = _scale_min_levels(x, 31, -0.5, 15)
    fifth = ((levels >> 4) & 1) << np.arange(8, dtype=np.uint8)[None, :, None]  # bit j: sub-block j
    qh = np.bitwise_or.reduce(fifth, axis=1).astype(np.uint8)
    return np.concatenate([head, qh, _low_nibbles(levels)], axis=1).reshape(*shape[:-1], -1)


def _make_qx_quants(x: np.ndarray, nmax: int):
    """Per row (sub-block of 16): a signed scale with levels -nmax..nmax-1 minimising the x²-weighted
    error, over 19 trial inverse scales around -nmax / (the value of largest magnitude)."""
    idx = np.abs(x).argmax(axis=1)[:, None]
    peak = np.take_along_axis(x, idx, axis=1)
    zero = np.abs(peak) < GROUP_MAX_EPS
    peak = np.where(zero, 1, peak)
    w = x * x

    def trial(iscale):
        lv = np.clip(_rint(iscale * x), -nmax, nmax - 1)
        return lv, (w * x * lv).sum(axis=1, keepdims=True), (w * lv * lv).sum(axis=1, keepdims=True)

    levels, sumlx, suml2 = trial(-nmax / peak)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 > 0, sumlx / suml2, 0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        lv, sumlx, suml2 = trial(-(nmax + 0.1 * step) / peak)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(better, sumlx / suml2, scale)
        best = np.where(better, scale * sumlx, best)
        levels = np.where(better, lv, levels)
    return np.where(zero, 0, scale)[:, 0].astype(np.float32), np.where(zero, 0, levels) + nmax


def quantize_q6_k(data: np.ndarray) -> np.ndarray:
    x, shape = _superblocks(data)
    nb = x.shape[0]
    scales, levels = _make_qx_quants(x.reshape(nb * 16, 16), 32)
    scales, levels = scales.reshape(nb, 16), levels.reshape(nb, 16, 16)
    pick = np.abs(scales).argmax(axis=1)[:, None]
    max_scale = np.take_along_axis(scales, pick, axis=1)
    empty = np.abs(max_scale) < GROUP_MAX_EPS  # an all-zero super-block: all bytes zero
    with np.errstate(divide="ignore"):
        iscale = np.where(empty, 0, -128 / np.where(empty, 1, max_scale))
        d = _f16(np.where(empty, 0, 1 / np.where(empty, 1, iscale)))
    sc = np.minimum(127, _rint(iscale * scales)).astype(np.int8)
    sub_d = (d.astype(np.float32) * sc)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_rint(x.reshape(nb, 16, 16) / sub_d), -32, 31) + 32
    levels = np.where(sub_d != 0, requant, levels).astype(np.uint8).reshape(nb, 2, 4, 32)
    levels = np.where(empty[:, :, None, None], 0, levels).astype(np.uint8)
    lo = levels & 0x0F
    ql = np.stack([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2).reshape(nb, 128)
    hi = (levels >> 4) << np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]
    qh = np.bitwise_or.reduce(hi, axis=2).astype(np.uint8).reshape(nb, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(nb, 2)], axis=1)
    return out.reshape(*shape[:-1], -1)


def _two_bit(levels: np.ndarray) -> np.ndarray:
    """(nb, 256) levels 0..3 -> 64 bytes: per 128 values, byte l holds values l, l+32, l+64, l+96."""
    quarters = levels.astype(np.uint8).reshape(levels.shape[0], 2, 4, 32)
    shifted = quarters << np.array([0, 2, 4, 6], dtype=np.uint8)[None, None, :, None]
    return np.bitwise_or.reduce(shifted, axis=2).astype(np.uint8).reshape(levels.shape[0], 64)


def quantize_q2_k(data: np.ndarray) -> np.ndarray:
    x, shape = _superblocks(data)
    nb = x.shape[0]
    sub = x.reshape(nb * 16, 16)
    scales, mins, levels = _make_qkx2_quants(sub, np.abs(sub), 3, -0.5, 0.1, 15, use_mad=True)
    scales, mins, levels = scales.reshape(nb, 16), mins.reshape(nb, 16), levels.reshape(nb, 16, 16)
    max_scale = np.maximum(scales.max(axis=1, keepdims=True), 0)
    max_min = np.maximum(mins.max(axis=1, keepdims=True), 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ls = np.where(max_scale > 0, _rint(15 / max_scale * scales), 0)
        lm = np.where(max_min > 0, _rint(15 / max_min * mins), 0)
    ls, lm = np.clip(ls, 0, 15), np.clip(lm, 0, 15)
    d, dmin = _f16(max_scale / 15), _f16(max_min / 15)
    sub_d = (d.astype(np.float32) * ls)[..., None]
    sub_m = (dmin.astype(np.float32) * lm)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_rint((x.reshape(nb, 16, 16) + sub_m) / sub_d), 0, 3)
    levels = np.where(sub_d != 0, requant, levels).reshape(nb, 256)
    out = np.concatenate([(ls | (lm << 4)).astype(np.uint8), _two_bit(levels), d.view(np.uint8).reshape(nb, 2),
                          dmin.view(np.uint8).reshape(nb, 2)], axis=1)
    return out.reshape(*shape[:-1], -1)


def _make_q3_quants(x: np.ndarray, nmax: int):
    """Per row (sub-block of 16): a signed scale with levels -nmax..nmax-1, from -nmax / (the
    value of largest magnitude), then up to 5 passes of per-value level changes that raise the
    x²-weighted fit (llama.cpp's ``make_q3_quants`` with ``do_rmse``)."""
    idx = np.abs(x).argmax(axis=1)[:, None]
    peak = np.take_along_axis(x, idx, axis=1)[:, 0]
    zero = np.abs(peak) < GROUP_MAX_EPS
    peak = np.where(zero, 1, peak)
    levels = np.clip(_rint((-nmax / peak)[:, None] * x), -nmax, nmax - 1)
    w = x * x
    sumlx, suml2 = (w * x * levels).sum(axis=1), (w * levels * levels).sum(axis=1)
    for _ in range(5):
        changed = np.zeros(len(x), dtype=bool)
        for i in range(x.shape[1]):
            wi, xi, li = w[:, i], x[:, i], levels[:, i]
            slx, sl2 = sumlx - wi * xi * li, suml2 - wi * li * li
            with np.errstate(divide="ignore", invalid="ignore"):
                new = np.clip(_rint(np.where(slx > 0, xi * sl2 / slx, 0)), -nmax, nmax - 1)
            slx, sl2 = slx + wi * xi * new, sl2 + wi * new * new
            take = ((sumlx - wi * xi * li) > 0) & (new != li) & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            levels[:, i] = np.where(take, new, li)
            sumlx, suml2 = np.where(take, slx, sumlx), np.where(take, sl2, suml2)
            changed |= take
        if not changed.any():
            break
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(zero, 0, sumlx / suml2)
    return scale.astype(np.float32), np.where(zero[:, None], 0, levels + nmax)


def quantize_q3_k(data: np.ndarray) -> np.ndarray:
    x, shape = _superblocks(data)
    nb = x.shape[0]
    scales, levels = _make_q3_quants(x.reshape(nb * 16, 16), 4)
    scales, levels = scales.reshape(nb, 16), levels.reshape(nb, 16, 16)
    max_scale = np.take_along_axis(scales, np.abs(scales).argmax(axis=1)[:, None], axis=1)
    has = max_scale != 0
    with np.errstate(divide="ignore"):
        iscale = np.where(has, -32 / np.where(has, max_scale, 1), 0)
    ls = np.where(has, np.clip(_rint(iscale * scales), -32, 31) + 32, 0).astype(np.uint8)  # 6 bits, offset 32
    d = _f16(np.where(has, 1 / np.where(has, iscale, 1), 0))
    packed = np.empty((nb, 12), dtype=np.uint8)
    packed[:, :8] = (ls[:, :8] & 0x0F) | ((ls[:, 8:] & 0x0F) << 4)
    high = (ls.reshape(nb, 4, 4) >> 4) << np.array([0, 2, 4, 6], dtype=np.uint8)[None, :, None]
    packed[:, 8:] = np.bitwise_or.reduce(high, axis=1)  # byte 8 + j % 4, bits 2 * (j // 4)
    sub_d = (d.astype(np.float32) * (ls.astype(np.int32) - 32))[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_rint(x.reshape(nb, 16, 16) / sub_d), -4, 3) + 4
    levels = np.where(sub_d != 0, requant, levels).reshape(nb, 256)
    high_bit = levels > 3  # third bit in hmask: byte j % 32, bit j // 32
    hmask = np.bitwise_or.reduce(high_bit.reshape(nb, 8, 32).astype(np.uint8)
                                 << np.arange(8, dtype=np.uint8)[None, :, None], axis=1).astype(np.uint8)
    out = np.concatenate([hmask, _two_bit(np.where(high_bit, levels - 4, levels)), packed,
                          d.view(np.uint8).reshape(nb, 2)], axis=1)
    return out.reshape(*shape[:-1], -1)


K_QUANTIZERS = {"Q2_K": quantize_q2_k, "Q3_K": quantize_q3_k, "Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k,
                "Q6_K": quantize_q6_k}
