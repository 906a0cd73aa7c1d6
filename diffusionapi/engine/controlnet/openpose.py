"""OpenPose body keypoints (``openpose`` module, ``body_pose_model.pth``) and the pose map drawn from them.

The network is the CMU body model as the published PyTorch port lays it out (flat names:
``conv1_1`` ... ``conv4_4_CPM`` VGG stem, stage 1 ``conv5_<n>_CPM_L1/L2``, stages 2-6
``Mconv<n>_stage<s>_L1/L2``; L1 = 38 part-affinity fields, L2 = 19 heatmaps), built here with the
widths and kernels read from the file's tensors. From its outputs, written from the OpenPose paper's
description: heatmap peaks (Gaussian-smoothed local maxima above 0.1) are the candidate
keypoints; each limb's candidate pairs are scored by the affinity field sampled along the segment
(at least 80 % of 10 samples above 0.05, mean plus a distance prior above 0) and matched
greedily; limbs sharing keypoints join into people, and people with fewer than 4 keypoints or a
mean score under 0.4 are dropped. The map is the extension's drawing: coloured limbs (60 %
brightness) and keypoint dots on black.
"""
from __future__ import annotations

import math
import numpy as np

from .imageops import hwc3, resize_short_side

# 18 COCO keypoints (1-based in the tables, as OpenPose numbers them): limbs and their PAF channels
LIMBS = [(2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13), (13, 14),
         (2, 1), (1, 15), (15, 17), (1, 16), (16, 18), (3, 17), (6, 18)]
PAF_CHANNELS = [(12, 13), (20, 21), (14, 15), (16, 17), (22, 23), (24, 25), (0, 1), (2, 3), (4, 5), (6, 7), (8, 9),
                (10, 11), (28, 29), (30, 31), (34, 35), (32, 33), (36, 37), (18, 19), (26, 27)]
COLORS = [(255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
          (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
          (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85)]
PEAK_THRESHOLD, PAF_THRESHOLD, SAMPLES = 0.1, 0.05, 10


# ---------------------------------------------------------------------------- the network

_STEM = ["conv1_1", "conv1_2", "pool", "conv2_1", "conv2_2", "pool", "conv3_1", "conv3_2", "conv3_3", "conv3_4",
         "pool", "conv4_1", "conv4_2", "conv4_3_CPM", "conv4_4_CPM"]


def build_body_model(sd: dict):
    """The body network, sized from the state dict (flat names, as the published file has them)."""
    import torch
    from torch import nn

    def seq(names: list[str], last_plain: str | None):
        layers = []
        for n in names:
            if n == "pool":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            w = sd[f"{n}.weight"]
            conv = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], padding=w.shape[2] // 2)
            layers += [conv] if n == last_plain else [conv, nn.ReLU(inplace=True)]
        return nn.Sequential(*layers)

    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.names: dict[str, list[str]] = {}
            self.stem = seq(_STEM, None)
            self.names["stem"] = [n for n in _STEM if n != "pool"]
            self.stages = nn.ModuleList()
            stage = 1
            while True:
                pair = []
                for branch in ("L1", "L2"):
                    if stage == 1:
                        names = sorted((k[:-len(".weight")] for k in sd if k.startswith("conv5_")
                                        and k.endswith(f"_CPM_{branch}.weight")), key=lambda n: int(n[6]))
                    else:
                        names = sorted((k[:-len(".weight")] for k in sd if k.startswith("Mconv")
                                        and k.endswith(f"_stage{stage}_{branch}.weight")),
                                       key=lambda n: int(n[5:n.index("_")]))
                    if not names:
                        break
                    pair.append(seq(names, names[-1]))
                    self.names[f"{stage}{branch}"] = names
                if len(pair) < 2:
                    break
                self.stages.append(nn.ModuleList(pair))
                stage += 1
            if not self.stages:
                raise ValueError("no OpenPose stages (conv5_1_CPM_L1 ...) in the file")

        def forward(self, x):
            features = self.stem(x)
            h = features
            for paf_net, heat_net in self.stages:
                paf, heat = paf_net(h), heat_net(h)
                h = torch.cat([paf, heat, features], 1)
            return paf, heat

    model = Body()
    # the flat published names -> this module's parameters, in the order both list them
    own = dict(model.named_parameters())
    mapping = {}
    convs = [m for m in model.stem if isinstance(m, nn.Conv2d)]
    for n, m in zip(model.names["stem"], convs):
        mapping[f"{n}.weight"], mapping[f"{n}.bias"] = m.weight, m.bias
    for s, (paf_net, heat_net) in enumerate(model.stages, start=1):
        for branch, net in (("L1", paf_net), ("L2", heat_net)):
            for n, m in zip(model.names[f"{s}{branch}"], [m for m in net if isinstance(m, nn.Conv2d)]):
                mapping[f"{n}.weight"], mapping[f"{n}.bias"] = m.weight, m.bias
    missing = [k for k in mapping if k not in sd]
    unplaced = [k for k in sd if k not in mapping]
    if missing or unplaced or len(mapping) != len(own):
        raise ValueError(f"not the OpenPose body model's layout ({len(missing)} missing, {len(unplaced)} unplaced"
                         f"{', e.g. ' + (missing or unplaced)[0] if missing or unplaced else ''})")
    with torch.no_grad():
        for k, p in mapping.items():
            if tuple(sd[k].shape) != tuple(p.shape):
                raise ValueError(f"{k} is {tuple(sd[k].shape)}, the layout needs {tuple(p.shape)}")
            p.copy_(sd[k])
    return model


def body_maps(img: np.ndarray, model, dev) -> tuple[np.ndarray, np.ndarray]:
    """(heatmaps (H, W, 19), affinity fields (H, W, 38)) of an RGB image at its own size: the
    network sees it scaled to 184 px high (half of OpenPose's 368 box, as the extension runs it; stride 8,
    padded with grey), its outputs scaled back."""
    import cv2
    import torch

    h, w = img.shape[:2]
    scale = 0.5 * 368 / h
    small = cv2.resize(img[:, :, ::-1], (0, 0), fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)  # BGR, as trained
    sh, sw = small.shape[:2]
    padded = np.full((sh + (-sh % 8), sw + (-sw % 8), 3), 128, np.uint8)
    padded[:sh, :sw] = small
    x = torch.from_numpy(padded.astype(np.float32) / 256 - 0.5).permute(2, 0, 1)[None].to(dev)
    with torch.inference_mode():
        paf, heat = model(x)

    def back(t):
        a = t[0].float().cpu().numpy().transpose(1, 2, 0)
        a = cv2.resize(a, (0, 0), fx=8, fy=8, interpolation=cv2.INTER_CUBIC)[:sh, :sw]
        return cv2.resize(a, (w, h), interpolation=cv2.INTER_CUBIC)

    return back(heat), back(paf)


# ---------------------------------------------------------------------------- keypoints to people

def _peaks(heatmaps: np.ndarray) -> list[list[tuple[float, float, float, int]]]:
    """Per keypoint type: (x, y, score, id) of each local maximum above the threshold."""
    import cv2

    out, next_id = [], 0
    for part in range(18):
        raw = heatmaps[:, :, part]
        m = cv2.GaussianBlur(raw.astype(np.float32), (0, 0), 3)
        peak = m > PEAK_THRESHOLD
        peak[1:, :] &= m[1:, :] >= m[:-1, :]
        peak[:-1, :] &= m[:-1, :] >= m[1:, :]
        peak[:, 1:] &= m[:, 1:] >= m[:, :-1]
        peak[:, :-1] &= m[:, :-1] >= m[:, 1:]
        ys, xs = np.nonzero(peak)
        found = [(float(x), float(y), float(raw[y, x]), next_id + i) for i, (y, x) in enumerate(zip(ys, xs))]
        next_id += len(found)
        out.append(found)
    return out


def people_from_maps(heatmaps: np.ndarray, pafs: np.ndarray) -> tuple[list[tuple], list[list[int]]]:
    """(candidates [(x, y, score, id)], people: 18 candidate ids each, -1 where missing)."""
    peaks = _peaks(heatmaps)
    candidates = [c for part in peaks for c in part]
    h = heatmaps.shape[0]
    connections: list[list[tuple[int, int, float]] | None] = []
    for (a, b), (cx, cy) in zip(LIMBS, PAF_CHANNELS):
        cand_a, cand_b = peaks[a - 1], peaks[b - 1]
        if not cand_a or not cand_b:
            connections.append(None)
            continue
        scored = []
        for i, pa in enumerate(cand_a):
            for j, pb in enumerate(cand_b):
                vec = np.array([pb[0] - pa[0], pb[1] - pa[1]])
                norm = max(0.001, math.hypot(*vec))
                vec = vec / norm
                xs = np.rint(np.linspace(pa[0], pb[0], SAMPLES)).astype(int)
                ys = np.rint(np.linspace(pa[1], pb[1], SAMPLES)).astype(int)
                along = pafs[ys, xs, cx] * vec[0] + pafs[ys, xs, cy] * vec[1]
                score = float(along.mean()) + min(0.5 * h / norm - 1, 0)
                if np.count_nonzero(along > PAF_THRESHOLD) > 0.8 * SAMPLES and score > 0:
                    scored.append((i, j, score))
        chosen, used_a, used_b = [], set(), set()
        for i, j, score in sorted(scored, key=lambda t: t[2], reverse=True):
            if i in used_a or j in used_b:
                continue
            chosen.append((cand_a[i][3], cand_b[j][3], score))
            used_a.add(i)
            used_b.add(j)
            if len(chosen) >= min(len(cand_a), len(cand_b)):
                break
        connections.append(chosen)

    score_of = {c[3]: c[2] for c in candidates}
    people: list[list[float]] = []  # 18 ids, then total score, then keypoint count
    for k, ((a, b), conns) in enumerate(zip(LIMBS, connections)):
        if conns is None:
            continue
        ia, ib = a - 1, b - 1
        for id_a, id_b, score in conns:
            owners = [n for n, p in enumerate(people) if p[ia] == id_a or p[ib] == id_b][:2]
            if len(owners) == 1:
                p = people[owners[0]]
                if p[ib] != id_b:
                    p[ib] = id_b
                    p[19] += 1
                    p[18] += score_of[id_b] + score
            elif len(owners) == 2:
                p1, p2 = people[owners[0]], people[owners[1]]
                if not any(p1[n] >= 0 and p2[n] >= 0 for n in range(18)):  # disjoint: one person
                    for n in range(18):
                        if p2[n] >= 0:
                            p1[n] = p2[n]
                    p1[18] += p2[18] + score
                    p1[19] += p2[19]
                    del people[owners[1]]
                else:
                    p1[ib] = id_b
                    p1[19] += 1
                    p1[18] += score_of[id_b] + score
            elif k < 17:  # (the last two limbs only join keypoints already placed)
                row = [-1.0] * 18 + [score_of[id_a] + score_of[id_b] + score, 2.0]
                row[ia], row[ib] = id_a, id_b
                people.append(row)
    kept = [p for p in people if p[19] >= 4 and p[18] / p[19] >= 0.4]
    return candidates, [[int(v) for v in p[:18]] for p in kept]


def draw(candidates, people, height: int, width: int) -> np.ndarray:
    """The pose map: limbs (ellipses, 60 % brightness) then keypoints (4 px dots) on black."""
    import cv2

    by_id = {c[3]: c for c in candidates}
    canvas = np.zeros((height, width, 3), np.uint8)
    for i, (a, b) in enumerate(LIMBS[:17]):
        for p in people:
            if p[a - 1] < 0 or p[b - 1] < 0:
                continue
            (x1, y1), (x2, y2) = by_id[p[a - 1]][:2], by_id[p[b - 1]][:2]
            length = math.hypot(x1 - x2, y1 - y2)
            angle = math.degrees(math.atan2(y1 - y2, x1 - x2))
            poly = cv2.ellipse2Poly((int((x1 + x2) / 2), int((y1 + y2) / 2)), (int(length / 2), 4), int(angle), 0,
                                    360, 1)
            cv2.fillConvexPoly(canvas, poly, COLORS[i])
    canvas = (canvas * 0.6).astype(np.uint8)
    for i in range(18):
        for p in people:
            if p[i] >= 0:
                x, y = by_id[p[i]][:2]
                cv2.circle(canvas, (int(x), int(y)), 4, COLORS[i], thickness=-1)
    return canvas


def pose_json(candidates, people, height: int, width: int) -> dict:
    """The OpenPose JSON the extension's ``poses`` carries: pixel coordinates, ``[x, y, 1.0]`` per
    keypoint found and ``[0, 0, 0]`` per missing one; body only."""
    by_id = {c[3]: c for c in candidates}
    return {"people": [{"pose_keypoints_2d": [v for i in p for v in ((float(by_id[i][0]), float(by_id[i][1]), 1.0)
                                                                      if i >= 0 else (0.0, 0.0, 0.0))],
                        "face_keypoints_2d": None, "hand_left_keypoints_2d": None, "hand_right_keypoints_2d": None}
                       for p in people],
            "canvas_width": width, "canvas_height": height}


def detect_body(img: np.ndarray, res: int, model, dev) -> tuple[np.ndarray, dict]:
    """(pose map at the processor resolution, its OpenPose JSON); ``model``: build_body_model's, on ``dev``."""
    img = resize_short_side(img, res)
    heat, paf = body_maps(img, model, dev)
    candidates, people = people_from_maps(heat, paf)
    h, w = img.shape[:2]
    return hwc3(draw(candidates, people, h, w)), pose_json(candidates, people, h, w)
