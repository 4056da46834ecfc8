"""OpenPose body keypoints from controlnet-aux's body network, with our own post-processing.

controlnet-aux's `Body.__call__` spends about two thirds of its time around the network: it resizes the 19
heatmaps and 38 part-affinity fields one channel at a time, blurs each heatmap with scipy, builds four
full-size shifted copies per part to find peaks, and scores limb candidates pair by pair in Python. This is the
same algorithm (same resizes, blur, peak rule, limb scoring and greedy person assembly, so the same candidate
and subset arrays) with whole-array resizes, OpenCV's blur, in-place peak tests and limb scoring vectorised
over all candidate pairs. `FastBody` stands in for the detector's `body_estimation`; hands and faces are
unchanged.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch

_BOX, _STRIDE, _PAD_VALUE = 368, 8, 128
_PEAK_THRESHOLD, _PAF_THRESHOLD, _SAMPLES = 0.1, 0.05, 10
# the 19 limbs as 1-based part pairs, and the two PAF channels (offset by the 19 heatmaps) of each
_LIMBS = [(2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13), (13, 14),
          (2, 1), (1, 15), (15, 17), (1, 16), (16, 18), (3, 17), (6, 18)]
_PAF_CHANNELS = [(31, 32), (39, 40), (33, 34), (35, 36), (41, 42), (43, 44), (19, 20), (21, 22), (23, 24), (25, 26),
                 (27, 28), (29, 30), (47, 48), (49, 50), (53, 54), (51, 52), (55, 56), (37, 38), (45, 46)]


def _resize(x: np.ndarray, width: int, height: int) -> np.ndarray:
    """controlnet-aux's rule: area when shrinking, Lanczos when growing (all channels in one call)."""
    shrinking = (height + width) / float(x.shape[0] + x.shape[1]) < 1
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LANCZOS4
    if x.ndim == 3 and x.shape[2] > 4 and shrinking:
        # OpenCV's area shrink by a non-integer factor takes at most 4 channels (small images hit it); it works
        # channel by channel, so 4 at a time gives the same maps.
        parts = [cv2.resize(np.ascontiguousarray(x[:, :, i:i + 4]), (width, height), interpolation=interpolation)
                 for i in range(0, x.shape[2], 4)]
        return np.concatenate([p if p.ndim == 3 else p[:, :, None] for p in parts], axis=2)
    return cv2.resize(x, (width, height), interpolation=interpolation)


class FastBody:
    """Called like controlnet-aux's Body (BGR image -> candidate, subset) on that Body's network."""

    def __init__(self, aux_body):
        self.model = aux_body.model
        self.format_body_result = aux_body.format_body_result

    def __call__(self, bgr: np.ndarray):
        heatmaps, pafs = self._maps(bgr)
        peaks = self._peaks(heatmaps)
        connections = [self._connect(peaks[a - 1], peaks[b - 1], pafs, (ca - 19, cb - 19), bgr.shape[0])
                       for (a, b), (ca, cb) in zip(_LIMBS, _PAF_CHANNELS)]
        candidate = np.array([peak for part in peaks for peak in part])
        return candidate, self._people(connections, candidate)

    def _maps(self, bgr: np.ndarray):
        """Heatmaps (H x W x 19) and PAFs (H x W x 38) at the image's size, float32. controlnet-aux widens them to
        float64, which holds the same values (one scale: its average is the map itself): the heatmaps are widened
        one channel at a time for the blur, the PAF samples as numpy multiplies them by float64 unit vectors.
        Whole float64 maps: 140 MB more at peak for a 768 x 512 image."""
        h, w = bgr.shape[:2]
        scale = 0.5 * _BOX / h
        small = _resize(bgr, int(w * scale), int(h * scale))
        pad_h, pad_w = (-small.shape[0]) % _STRIDE, (-small.shape[1]) % _STRIDE
        padded = cv2.copyMakeBorder(small, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=(_PAD_VALUE,) * 3)
        x = torch.from_numpy(padded.astype(np.float32)).permute(2, 0, 1)[None] / 256 - 0.5
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            paf, heat = self.model(x.contiguous().to(device))
        maps = []
        for out in (heat, paf):
            m = np.ascontiguousarray(out[0].float().cpu().numpy().transpose(1, 2, 0))
            m = _resize(m, m.shape[1] * _STRIDE, m.shape[0] * _STRIDE)
            m = m[:padded.shape[0] - pad_h, :padded.shape[1] - pad_w]
            maps.append(_resize(np.ascontiguousarray(m), w, h))
        return maps

    @staticmethod
    def _peaks(heatmaps: np.ndarray) -> list[list[tuple]]:
        """Per part: (x, y, score, id) at local maxima of the blurred heatmap above the threshold."""
        out, next_id = [], 0
        for part in range(18):
            raw = heatmaps[:, :, part].astype(np.float64)  # scipy's float64 blur in controlnet-aux
            blurred = cv2.GaussianBlur(raw, (25, 25), 3, borderType=cv2.BORDER_REFLECT)  # = scipy sigma 3
            rim = np.pad(blurred, 1)  # zeros outside, as the shifted copies have
            centre = rim[1:-1, 1:-1]
            peak = centre > _PEAK_THRESHOLD
            for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
                peak &= centre >= rim[dy:dy + centre.shape[0], dx:dx + centre.shape[1]]
            ys, xs = np.nonzero(peak)
            out.append([(x, y, raw[y, x], next_id + i) for i, (y, x) in enumerate(zip(ys, xs))])
            next_id += len(ys)
        return out

    @staticmethod
    def _connect(cand_a, cand_b, pafs: np.ndarray, channels, image_height: int) -> np.ndarray:
        """Limb candidates scored by the PAF along the segment, then picked greedily: rows (id_a, id_b, score, i, j)."""
        if not cand_a or not cand_b:
            return None
        a = np.array([c[:2] for c in cand_a], dtype=np.float64)[:, None, :]
        b = np.array([c[:2] for c in cand_b], dtype=np.float64)[None, :, :]
        vec = b - a
        norm = np.maximum(np.sqrt(vec[..., 0] ** 2 + vec[..., 1] ** 2), 0.001)
        unit = vec / norm[..., None]
        xs, ys = (np.rint(_linspace(a[..., c], b[..., c])).astype(int) for c in (0, 1))
        along = pafs[ys, xs, channels[0]] * unit[..., 0, None] + pafs[ys, xs, channels[1]] * unit[..., 1, None]
        prior = along.sum(-1) / _SAMPLES + np.minimum(0.5 * image_height / norm - 1, 0)
        ok = ((along > _PAF_THRESHOLD).sum(-1) > 0.8 * _SAMPLES) & (prior > 0)
        pairs = [(i, j, prior[i, j]) for i, j in zip(*np.nonzero(ok))]
        pairs.sort(key=lambda p: p[2], reverse=True)
        rows, used_a, used_b = [], set(), set()
        for i, j, score in pairs:
            if i not in used_a and j not in used_b:
                rows.append([cand_a[i][3], cand_b[j][3], score, i, j])
                used_a.add(i)
                used_b.add(j)
                if len(rows) >= min(len(cand_a), len(cand_b)):
                    break
        return np.array(rows, dtype=np.float64).reshape(-1, 5)

    @staticmethod
    def _people(connections, candidate: np.ndarray) -> np.ndarray:
        """Greedy assembly of limbs into people: rows of 18 candidate indices (-1: missing), score, part count."""
        people = np.full((0, 20), -1.0)
        for k, limbs in enumerate(connections):
            if limbs is None:
                continue
            part_a, part_b = _LIMBS[k][0] - 1, _LIMBS[k][1] - 1
            for id_a, id_b, score, _, _ in limbs:
                found = [r for r in range(len(people)) if people[r, part_a] == id_a or people[r, part_b] == id_b][:2]
                if len(found) == 1 or (len(found) == 2 and _overlap(people[found[0]], people[found[1]])):
                    row = people[found[0]]
                    if len(found) == 2 or row[part_b] != id_b:
                        row[part_b] = id_b
                        row[-1] += 1
                        row[-2] += candidate[int(id_b), 2] + score
                elif len(found) == 2:  # two disjoint people joined by this limb: merge them
                    first, second = people[found[0]], people[found[1]]
                    first[:-2] += second[:-2] + 1
                    first[-2:] += second[-2:]
                    first[-2] += score
                    people = np.delete(people, found[1], 0)
                elif k < 17:
                    row = np.full(20, -1.0)
                    row[part_a], row[part_b] = id_a, id_b
                    row[-1] = 2
                    row[-2] = candidate[int(id_a), 2] + candidate[int(id_b), 2] + score
                    people = np.vstack([people, row])
        keep = (people[:, -1] >= 4) & (people[:, -2] / people[:, -1] >= 0.4)  # every row has >= 2 parts
        return people[keep]


def _linspace(start: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """np.linspace(start, stop, _SAMPLES) for every pair at once, with numpy's float operations and exact end."""
    out = np.arange(_SAMPLES) * ((stop - start) / (_SAMPLES - 1))[..., None] + start[..., None]
    out[..., -1] = stop
    return out


def _overlap(first: np.ndarray, second: np.ndarray) -> bool:
    return bool(np.any((first[:-2] >= 0) & (second[:-2] >= 0)))
