"""Control fidelity, as ControlNet++ measures controllability: generate from a (prompt, conditioning image) pair,
run the unit's own preprocessor on the generated image, and compare that re-detected map with the condition.

One score per kind of map, picked through a registry keyed by the preprocessor's control type (never by a
name's substring). Each score is 1.0 for identical maps and lower the less they agree; its one-line
definition is `Score.definition` (also in docs/fidelity.md).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np
from PIL import Image

EDGE_TOLERANCE_PX = 2  # an edge pixel within this distance of the other map's edge counts as matched
EDGE_THRESHOLD = 128  # soft edge maps (HED, PiDiNet, line art) are binarised here
PCK_ALPHA = 0.1  # a keypoint is correct within this fraction of the person's larger keypoint-box side
SEG_MIN_SHARE = 0.002  # palette colours covering less of the condition are resizing blends, not classes
SEG_MAX_DISTANCE = 40.0  # a pixel farther than this (RGB) from every class colour belongs to no class


@dataclasses.dataclass
class Observation:
    """One map to compare: the HxWx3 uint8 image, and for pose scores the OpenPose JSON of its people."""
    map: np.ndarray
    pose: Optional[dict] = None


@dataclasses.dataclass(frozen=True)
class Score:
    name: str
    definition: str
    compare: Callable[[Observation, Observation], float]  # (condition, re-detected) -> score, 1.0 = identical
    needs_pose: bool = False


# ---------------------------------------------------------------- the scores

def _grey(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array, dtype=np.float64)
    return array.mean(axis=-1) if array.ndim == 3 else array


def edge_f1(condition: Observation, detected: Observation, tolerance: int = EDGE_TOLERANCE_PX) -> float:
    from scipy import ndimage

    wanted, got = _grey(condition.map) >= EDGE_THRESHOLD, _grey(detected.map) >= EDGE_THRESHOLD
    if not wanted.any() or not got.any():
        return float(wanted.any() == got.any())  # both empty agree; one empty matches nothing
    near_wanted = ndimage.distance_transform_edt(~wanted) <= tolerance
    near_got = ndimage.distance_transform_edt(~got) <= tolerance
    precision = near_wanted[got].mean()
    recall = near_got[wanted].mean()
    return float(2 * precision * recall / (precision + recall)) if precision + recall else 0.0


def _palette(pixels: np.ndarray) -> np.ndarray:
    colours, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
    return colours[counts >= SEG_MIN_SHARE * counts.sum()].astype(np.float64)


def _classes(pixels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    distance = np.linalg.norm(pixels.reshape(-1, 1, 3).astype(np.float64) - palette[None], axis=-1)
    labels = distance.argmin(axis=1)
    labels[distance.min(axis=1) > SEG_MAX_DISTANCE] = -1
    return labels


def segmentation_miou(condition: Observation, detected: Observation) -> float:
    palette = _palette(condition.map)
    wanted, got = _classes(condition.map, palette), _classes(detected.map, palette)
    ious = []
    for label in range(len(palette)):
        a, b = wanted == label, got == label
        union = np.logical_or(a, b).sum()
        if union:
            ious.append(np.logical_and(a, b).sum() / union)
    return float(np.mean(ious)) if ious else 0.0


def map_correlation(condition: Observation, detected: Observation) -> float:
    a = np.asarray(condition.map, dtype=np.float64).reshape(-1, np.shape(condition.map)[-1])
    b = np.asarray(detected.map, dtype=np.float64).reshape(-1, np.shape(detected.map)[-1])
    values = []
    for channel in range(a.shape[1]):
        x, y = a[:, channel] - a[:, channel].mean(), b[:, channel] - b[:, channel].mean()
        sx, sy = np.sqrt((x * x).sum()), np.sqrt((y * y).sum())
        if sx == 0 and sy == 0:
            values.append(float(np.array_equal(a[:, channel], b[:, channel])))
        elif sx == 0 or sy == 0:
            values.append(0.0)  # a flat map carries no depth (or normal) structure to agree with
        else:
            values.append(float((x * y).sum() / (sx * sy)))
    return max(0.0, float(np.mean(values)))


def _people(pose: Optional[dict]) -> list[np.ndarray]:
    people = []
    for person in (pose or {}).get("people", []):
        flat = person.get("pose_keypoints_2d") or []
        points = np.asarray(flat, dtype=np.float64).reshape(-1, 3)
        if len(points) and (points[:, 2] > 0).any():
            people.append(points)
    for animal in (pose or {}).get("animals", []):  # animal_openpose's AP-10K JSON: [x, y, score] per keypoint
        points = np.asarray(animal, dtype=np.float64).reshape(-1, 3)
        if len(points) and (points[:, 2] > 0).any():
            people.append(points)
    return people


def _correct(wanted: np.ndarray, got: np.ndarray) -> tuple[int, int]:
    visible = wanted[:, 2] > 0
    box = wanted[visible, :2]
    reach = PCK_ALPHA * max(1.0, float((box.max(axis=0) - box.min(axis=0)).max()))
    found = got[:, 2] > 0
    n = min(len(wanted), len(got))
    hits = visible[:n] & found[:n] & (np.linalg.norm(wanted[:n, :2] - got[:n, :2], axis=1) <= reach)
    return int(hits.sum()), int(visible.sum())


def pose_pck(condition: Observation, detected: Observation) -> float:
    wanted, got = _people(condition.pose), _people(detected.pose)
    if not wanted:
        return float(not got)
    hits = np.array([[_correct(w, g)[0] for g in got] for w in wanted]).reshape(len(wanted), len(got))
    total = sum(_correct(w, w)[1] for w in wanted)
    correct = 0
    while hits.size and hits.max() > 0:  # pair people by most keypoints in agreement, each one once
        i, j = np.unravel_index(int(hits.argmax()), hits.shape)
        correct += int(hits[i, j])
        hits[i, :], hits[:, j] = -1, -1
    return correct / total if total else 1.0


def ssim(condition: Observation, detected: Observation) -> float:
    from scipy import ndimage

    a, b = _grey(condition.map), _grey(detected.map)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(x):
        return ndimage.gaussian_filter(x, sigma=1.5, truncate=3.5)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(value.mean())


EDGE_F1 = Score("edge_f1", f"F1 of edge pixels (map >= {EDGE_THRESHOLD}) matched within {EDGE_TOLERANCE_PX} px "
                "between condition and re-detected map", edge_f1)
SEG_MIOU = Score("seg_miou", "mean IoU over the condition's palette classes (pixels go to the nearest class colour)",
                 segmentation_miou)
CORRELATION = Score("correlation", "Pearson correlation of condition and re-detected map per channel, averaged, "
                    "floored at 0 (invariant to the maps' scale and shift)", map_correlation)
POSE_PCK = Score("pose_pck", f"share of the condition's visible body keypoints re-detected within {PCK_ALPHA} of "
                 "the person's keypoint-box side (OpenPose JSON)", pose_pck, needs_pose=True)
SSIM = Score("ssim", "mean SSIM of the grey maps (Gaussian window sigma 1.5, standard constants)", ssim)

# control type (the preprocessor registry's) -> score; anything not listed gets SSIM
SCORES_BY_CONTROL_TYPE: dict[str, Score] = {
    "Canny": EDGE_F1, "Lineart": EDGE_F1, "SoftEdge": EDGE_F1, "Scribble": EDGE_F1,
    "MLSD": EDGE_F1, "Segmentation": SEG_MIOU, "Depth": CORRELATION, "NormalMap": CORRELATION,
    "OpenPose": POSE_PCK,
}
SCORES = {score.name: score for score in (EDGE_F1, SEG_MIOU, CORRELATION, POSE_PCK, SSIM)}


class FidelityError(ValueError):
    """Fidelity cannot be measured as asked (no preprocessor, a pose score without the source image)."""


def score_for(module: str) -> Score:
    from lib_controlnet.preprocess import get_preprocessor

    return SCORES_BY_CONTROL_TYPE.get(get_preprocessor(module).control_type, SSIM)


# ---------------------------------------------------------------- re-detection

@dataclasses.dataclass
class Detector:
    """The unit's preprocessor with its settings, run the same way on the condition's source and the output."""
    module: str
    threshold_a: Optional[float] = None
    threshold_b: Optional[float] = None

    @property
    def score(self) -> Score:
        return score_for(self.module)

    def observe(self, image: Image.Image) -> Observation:
        from lib_controlnet import preprocess

        array = np.asarray(image.convert("RGB"))
        resolution = min(array.shape[:2])
        if self.score.needs_pose:
            detected, pose = preprocess.run_pose(self.module, array, resolution)
            return Observation(_resize(detected, array.shape[:2]), pose)
        detected = preprocess.run(self.module, array, resolution, self.threshold_a, self.threshold_b,
                                  use_cache=False)
        return Observation(_resize(detected, array.shape[:2]))

    def condition(self, hint: Image.Image, source: Optional[Image.Image] = None) -> Observation:
        """The condition as the score reads it; a pose score needs the keypoints of the image it came from."""
        array = np.asarray(hint.convert("RGB"))
        if not self.score.needs_pose:
            return Observation(array)
        if source is None:
            raise FidelityError(f"{self.module} fidelity compares keypoints: it needs the images the pose maps "
                                "were detected from (the dataset's image column).")
        pose = self.observe(source.resize(hint.size)).pose
        return Observation(array, pose)


def _resize(array: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    if array.shape[:2] == tuple(hw):
        return array
    return np.asarray(Image.fromarray(array).resize((hw[1], hw[0]), Image.NEAREST))


@dataclasses.dataclass
class FidelityResult:
    score: str
    module: str
    values: list  # one per sample
    detected: list  # re-detected maps (HxWx3 uint8), for grids

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else float("nan")


def measure(detector: Detector, conditions: list[Observation], generated: list[Image.Image]) -> FidelityResult:
    values, maps = [], []
    for condition, image in zip(conditions, generated):
        observed = detector.observe(image.resize((condition.map.shape[1], condition.map.shape[0])))
        values.append(detector.score.compare(condition, observed))
        maps.append(observed.map)
    return FidelityResult(detector.score.name, detector.module, values, maps)


def module_of_dataset(path) -> tuple[str, Optional[float], Optional[float]]:
    """The preprocessor (and thresholds) a dataset built by ControlNet Studio was conditioned with; ("", ...)
    when the dataset does not say (a folder pair, someone else's dataset)."""
    import json
    from pathlib import Path

    manifest = Path(path).expanduser() / "manifest.json"
    try:
        config = json.loads(manifest.read_text("utf-8")).get("config", {})
    except (OSError, ValueError):
        return "", None, None
    return str(config.get("module") or ""), config.get("threshold_a"), config.get("threshold_b")


__all__ = ["Detector", "FidelityError", "FidelityResult", "Observation", "SCORES", "SCORES_BY_CONTROL_TYPE",
           "Score", "measure", "module_of_dataset", "score_for"]
