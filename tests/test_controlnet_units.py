"""ControlNet pieces without a server: resize modes, pixel perfect, soft weights, module names, A1111 unit forms."""
from __future__ import annotations

import numpy as np
import pytest

from diffusionapi.api.sdapi.controlnet import UnitError, controlnet_units
from diffusionapi.engine.controlnet import preprocessors as pp
from diffusionapi.engine.controlnet.units import fit, soft_scales


def test_resize_modes_cover_crop_fit_and_fill_with_the_border_median():
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :, 0] = 200  # border and all: red
    a[5:15, 15:25] = 255
    assert fit(a, 30, 30, "Just Resize").shape == (30, 30, 3)
    crop = fit(a, 30, 30, "Crop and Resize")  # scale 1.5 (covers), centre crop
    assert crop.shape == (30, 30, 3)
    filled = fit(a, 40, 40, "Resize and Fill")  # fits at 40x20, padded top and bottom
    assert filled.shape == (40, 40, 3) and (filled[0, 0] == [200, 0, 0]).all() and (filled[-1, -1] == [200, 0, 0]).all()
    edges = np.zeros((64, 64, 3), np.uint8)
    edges[:, 31] = 255  # a one-pixel line survives shrinking and the map stays binary
    small = fit(edges, 16, 16, "Just Resize")
    assert set(np.unique(small)) == {0, 255}


@pytest.mark.parametrize("image, target, mode, expected", [
    ((512, 768), (512, 512), "Crop and Resize", 512),   # cover: max(1, 2/3) * 512
    ((512, 768), (512, 512), "Resize and Fill", 341),   # fit: min(1, 2/3) * 512
    ((256, 256), (768, 512), "Crop and Resize", 768),
])
def test_pixel_perfect_resolution(image, target, mode, expected):
    assert pp.pixel_perfect_resolution(image, target, mode) == expected


def test_soft_weights_are_the_extensions():
    s = soft_scales(1.0, 13)
    assert s[-1] == 1.0 and s[0] == pytest.approx(0.825 ** 12)
    assert soft_scales(0.5, 10) == [0.5 * 0.825 ** (12 - i) for i in range(10)]  # SDXL: the first 10
    assert soft_scales(1.0, 4, adapter=True) == [0.25, 0.62, 0.825, 1.0]


def test_modules_by_name_label_alias_and_defaults_out_of_range():
    assert pp.find("Canny").name == "canny"
    assert pp.find("invert (from white bg & black line)").name == "invert"
    assert pp.find("binary").name == "threshold" and pp.find(None).name == "none" and pp.find("x") is None
    canny = pp.PREPROCESSORS["canny"]
    assert canny.params(-1, -1, 300) == (512, 100.0, 200.0)  # A1111: out of range -> the default
    assert canny.params(256, 50, 150) == (256, 50.0, 150.0)


def test_a1111_units_forms_defaults_and_legacy_names():
    w: list[str] = []
    units = controlnet_units({"ControlNet": {"args": [
        {"enabled": True, "model": "m [abc]", "image": {"image": "I", "mask": "M"}, "control_mode": 2,
         "resize_mode": "Inner Fit (Scale to Fit)", "hr_option": "Low res only"},
        {"enabled": True, "model": "m", "input_image": "I", "guidance": 0.4, "guessmode": True},
        {"model": "m", "image": "I"},                                    # the extension: disabled by default
        {"model": "m", "image": ["I", "M"], "image_fg": None},           # Forge: enabled by default
        {"enabled": True, "module": "reference_only", "model": "None"},  # skipped with a warning
    ]}}, w)
    assert [u["image"] for u in units] == ["I", "I", "I"] and [u["mask"] for u in units] == ["M", None, "M"]
    assert units[0]["control_mode"] == "ControlNet is more important" and units[0]["resize_mode"] == "Crop and Resize"
    assert units[0]["hires"] == "low" and units[0]["save_detected_map"] is True
    assert units[1]["guidance_end"] == 0.4 and units[1]["control_mode"] == "ControlNet is more important"
    assert len(w) == 1 and "reference_only" in w[0]
    with pytest.raises(UnitError, match="control_mode"):
        controlnet_units({"controlnet": {"args": [{"enabled": True, "model": "m", "control_mode": "loud"}]}}, [])
    assert controlnet_units({"ADetailer": {"args": [True]}}, []) == []
    union = controlnet_units({"controlnet": {"args": [{"enabled": True, "model": "u", "image": "I",
                                                       "union_control_type": "Depth"}]}}, [])
    assert union[0]["union_control_type"] == "Depth"


def test_cost_counts_controlnet_passes_in_their_window_and_ip_adapter_tokens():
    from types import SimpleNamespace as NS

    from diffusionapi.limits import job_cost

    def plan(controlnets=(), ip_adapters=(), hires=None):
        return NS(prompt="a", negative_prompt="", width=512, height=512, steps=20, batch_size=1, n_iter=1,
                  hires=hires, init=None, controlnets=controlnets, ip_adapters=ip_adapters)

    def cn(weight=1.0, start=0.0, end=1.0, hires="both", kind="controlnet"):
        return NS(entry=NS(kind=kind), weight=weight, guidance_start=start, guidance_end=end, hires=hires)

    one = job_cost(plan())[0]
    assert job_cost(plan([cn()]))[0] == pytest.approx(1.5 * one)          # half a UNet more per evaluation
    assert job_cost(plan([cn()] * 8))[0] == pytest.approx(5 * one)
    assert job_cost(plan([cn(start=0.2, end=0.7)]))[0] == pytest.approx(1.25 * one)
    assert job_cost(plan([cn(weight=0), cn(kind="t2i-adapter")]))[0] == pytest.approx(one)
    assert job_cost(plan([cn(hires="high")]))[0] == pytest.approx(1.5 * one)  # no hires pass: it guides the one
    hires = NS(width=1024, height=1024, steps=10)
    second = 1024 * 1024 * 10 / 1e6
    assert job_cost(plan([cn(hires="low")], hires=hires))[0] == pytest.approx(1.5 * one + second)
    assert job_cost(plan([cn(hires="high")], hires=hires))[0] == pytest.approx(one + 1.5 * second)
    # 4 images x 4 tokens = 16 tokens, as text chunks of 75: conditioning 1 + 16/75
    ip = NS(entry=NS(), images=(0,) * 4, weight=1.0)
    assert job_cost(plan(ip_adapters=[ip]))[0] == pytest.approx(one * (1 + 16 / 75))


def _stick_figure():
    """Heatmaps and affinity fields of one person, drawn by hand: a Gaussian peak per keypoint and,
    for each limb, its unit vector in a band along the segment (in that limb's own two channels)."""
    import cv2

    from diffusionapi.engine.controlnet.openpose import LIMBS, PAF_CHANNELS

    points = [(64, 20), (64, 36), (50, 38), (44, 56), (40, 72), (78, 38), (84, 56), (88, 72), (56, 74), (54, 96),
              (52, 118), (72, 74), (74, 96), (76, 118), (60, 16), (68, 16), (56, 18), (72, 18)]
    h = w = 128
    yy, xx = np.mgrid[0:h, 0:w]
    heat = np.zeros((h, w, 19), np.float32)
    for k, (x, y) in enumerate(points):
        heat[:, :, k] = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 2.0 ** 2))
    paf = np.zeros((h, w, 38), np.float32)
    for (a, b), (cx, cy) in list(zip(LIMBS, PAF_CHANNELS))[:17]:
        (x1, y1), (x2, y2) = points[a - 1], points[b - 1]
        v = np.array([x2 - x1, y2 - y1], np.float32)
        v /= np.linalg.norm(v)
        band = np.zeros((h, w), np.uint8)
        cv2.line(band, (x1, y1), (x2, y2), 1, thickness=3)
        paf[:, :, cx][band > 0], paf[:, :, cy][band > 0] = v[0], v[1]
    return points, heat, paf


def test_openpose_assembles_a_person_from_heatmaps_and_affinity_fields():
    from diffusionapi.engine.controlnet.openpose import COLORS, draw, people_from_maps, pose_json

    points, heat, paf = _stick_figure()
    candidates, people = people_from_maps(heat, paf)
    assert len(people) == 1 and min(people[0]) >= 0  # all 18 keypoints, one person
    got = pose_json(candidates, people, 128, 128)
    assert got["canvas_width"] == got["canvas_height"] == 128
    kp = got["people"][0]["pose_keypoints_2d"]
    assert [(kp[3 * i], kp[3 * i + 1]) for i in range(18)] == [(float(x), float(y)) for x, y in points]
    assert all(kp[3 * i + 2] == 1.0 for i in range(18))
    drawn = draw(candidates, people, 128, 128)
    assert tuple(drawn[20, 64]) == COLORS[0] and tuple(drawn[118, 76]) == COLORS[13]  # the dots, full colour
    assert drawn[0, 0].sum() == 0 and (drawn[100:110, 60:70].sum() == 0)              # black elsewhere
    # two people side by side stay two; without affinity fields no limb joins anyone
    both_heat = np.concatenate([heat, heat], axis=1)
    both_paf = np.concatenate([paf, paf], axis=1)
    assert len(people_from_maps(both_heat, both_paf)[1]) == 2
    assert people_from_maps(heat, np.zeros_like(paf))[1] == []
