"""Top-down keypoints from ONNX files through onnxruntime: a YOLOX detector finds boxes, an RTMPose-family model
(DWPose's whole body, RTMPose AP-10K) reads each box through its SimCC head.

Written here rather than taken from controlnet-aux: its 0.0.10 dwpose runs the .pth releases through
mmpose/mmdet/mmcv, which do not install beside the WebUI's pins, while the ONNX releases users have need only
onnxruntime plus the pre- and post-processing below. That processing follows the published DWPose ONNX pipeline
step by step, with the same arithmetic (so the boxes and keypoints are the same numbers), and differs only in
how the work is done: the anchor grid is built once per input size, NMS runs for the wanted classes only and on
the confident boxes alone, the crops are normalised through a per-channel table into one reused buffer (all
boxes in one batch on a GPU), and each run's SimCC vectors are decoded at once and dropped.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from annotators.runtime import load_once
from annotators.weights import AnnotatorWeightsError

DETECTOR_INPUT = (640, 640)  # yolox_l.onnx's fixed input (height, width)
_LETTERBOX_FILL = 114
_STRIDES = (8, 16, 32)
_CANDIDATE_SCORE = 0.1  # the pipeline's NMS candidates; an image with none anywhere has no boxes at all
_BOX_SCORE = 0.3  # boxes kept after NMS
_NMS_IOU = 0.45
_BOX_PADDING = 1.25  # each box is widened by this before the crop
_MEAN = (123.675, 116.28, 103.53)
_STD = (58.395, 57.12, 57.375)
_SIMCC_SPLIT = 2.0  # SimCC bins per input pixel

# (value - mean) / std for every uint8 value, computed in float64 and stored as float32, as the published
# pipeline computes it per pixel: a lookup gives the same numbers at a fraction of the cost
_NORMALISE = np.stack([((np.arange(256) - m) / s).astype(np.float32) for m, s in zip(_MEAN, _STD)])


def session(path: Path):
    """An onnxruntime session for this file, created once."""
    return load_once(("onnxruntime", str(path)), functools.partial(_new_session, Path(path)))


def _new_session(path: Path):
    try:
        import onnxruntime as ort
    except ImportError:
        raise AnnotatorWeightsError(f"{path.name} runs through onnxruntime, which is not installed: "
                                    "pip install onnxruntime") from None
    available = ort.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider",) if p in available] + ["CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), providers=providers)
    except Exception as error:  # onnxruntime raises its own classes for truncated or foreign files
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise AnnotatorWeightsError(f"{path} is not a readable ONNX model ({reason}); replace it with the "
                                    f"published {path.name}.") from None


def _input_hw(sess, fallback: tuple[int, int]) -> tuple[int, int]:
    shape = sess.get_inputs()[0].shape
    h, w = shape[2], shape[3]
    return (h, w) if isinstance(h, int) and isinstance(w, int) else fallback


@functools.lru_cache(maxsize=4)
def _anchor_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Each output row's cell (x, y) and stride: rows run level by level (stride 8, 16, 32), row-major."""
    cells, strides = [], []
    for stride in _STRIDES:
        gy, gx = np.mgrid[0:height // stride, 0:width // stride]
        cells.append(np.stack([gx.ravel(), gy.ravel()], axis=1))
        strides.append(np.full((gx.size, 1), stride))
    return (np.concatenate(cells).astype(np.float32), np.concatenate(strides).astype(np.float32))


def _letterbox(img: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """The image scaled to fit `size` at the top left, the rest grey 114, as a 1x3xHxW float32 batch."""
    ratio = min(size[0] / img.shape[0], size[1] / img.shape[1])
    new_h, new_w = int(img.shape[0] * ratio), int(img.shape[1] * ratio)
    batch = np.full((1, 3) + tuple(size), _LETTERBOX_FILL, dtype=np.float32)
    resized = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    batch[0, :, :new_h, :new_w] = resized.transpose(2, 0, 1)
    return batch, ratio


def _nms(boxes: np.ndarray) -> list[int]:
    """Greedy NMS over boxes in priority order (pixel-inclusive areas, as the pipeline counts them), from one IoU
    matrix; the positions kept."""
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    w = np.maximum(0.0, np.minimum(x2[:, None], x2[None]) - np.maximum(x1[:, None], x1[None]) + 1)
    h = np.maximum(0.0, np.minimum(y2[:, None], y2[None]) - np.maximum(y1[:, None], y1[None]) + 1)
    inter = w * h
    overlap = inter / (areas[:, None] + areas[None] - inter)
    suppressed = np.zeros(len(boxes), dtype=bool)
    keep = []
    for i in range(len(boxes)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed[i + 1:] |= overlap[i, i + 1:] > _NMS_IOU
    return keep


def detect_boxes(sess, img: np.ndarray, classes: Sequence[int]) -> np.ndarray | None:
    """Boxes (x1, y1, x2, y2 in image pixels, float64) of the given COCO classes, class by class in ascending
    order and by score within a class; None where no class of the 80 has a candidate at all."""
    size = _input_hw(sess, DETECTOR_INPUT)
    batch, ratio = _letterbox(img, size)
    raw = sess.run(None, {sess.get_inputs()[0].name: batch})[0][0]
    cells, strides = _anchor_grid(*size)
    objectness = raw[:, 4]
    if not (objectness * raw[:, 5:].max(axis=1) > _CANDIDATE_SCORE).any():
        return None
    centres = (raw[:, :2] + cells) * strides
    half = np.exp(raw[:, 2:4]) * strides / 2.0
    corners = np.concatenate([centres - half, centres + half], axis=1)
    corners /= ratio
    found = []
    for cls in sorted(classes):
        score = objectness * raw[:, 5 + cls]
        candidates = np.flatnonzero(score > _CANDIDATE_SCORE)
        # the pipeline's order: the same arg-sort of the same candidates (equal scores, common where a sigmoid
        # saturates, keep its order); confident boxes lead it, and only they survive, so NMS runs on them alone
        order = candidates[np.argsort(score[candidates])[::-1]]
        order = order[score[order] > _BOX_SCORE]
        if order.size:
            found.append(corners[order][_nms(corners[order])])
    if not found:
        return np.zeros((0, 4))
    return np.concatenate(found).astype(np.float64)


def _crop_matrix(center: np.ndarray, scale_w: float, out_w: int, out_h: int) -> np.ndarray:
    """The affine map of the box (centre, width) onto the model input, from three point pairs (the centre, the
    point half a width above it, and that vector turned a right angle), as the pipeline builds it."""
    def third(a, b):
        d = a - b
        return b + np.r_[-d[1], d[0]]

    src = np.zeros((3, 2), dtype=np.float32)
    dst = np.zeros((3, 2), dtype=np.float32)
    src[0] = center
    src[1] = center + np.array([0.0, -0.5 * scale_w])
    src[2] = third(src[0], src[1])
    dst[0] = (out_w * 0.5, out_h * 0.5)
    dst[1] = np.array([out_w * 0.5, out_h * 0.5]) + np.array([0.0, -0.5 * out_w])
    dst[2] = third(dst[0], dst[1])
    return cv2.getAffineTransform(src, dst)


def keypoints(sess, img: np.ndarray, boxes: np.ndarray, fallback_hw: tuple[int, int]) -> tuple[np.ndarray,
                                                                                                np.ndarray]:
    """(N, K, 2) keypoints in image pixels and (N, K) scores for each box; no box: the whole image is the box."""
    out_h, out_w = _input_hw(sess, fallback_hw)
    if len(boxes) == 0:
        boxes = np.array([[0, 0, img.shape[1], img.shape[0]]], dtype=np.float64)
    centers = (boxes[:, :2] + boxes[:, 2:]) * 0.5
    scales = (boxes[:, 2:] - boxes[:, :2]) * _BOX_PADDING
    aspect = out_w / out_h
    w, h = scales[:, :1], scales[:, 1:]
    scales = np.where(w > h * aspect, np.hstack([w, w / aspect]), np.hstack([h * aspect, h]))
    matrices = [_crop_matrix(center, scale[0], out_w, out_h) for center, scale in zip(centers, scales)]
    per_run = _boxes_per_run(sess, len(boxes))
    batch = np.empty((per_run, 3, out_h, out_w), dtype=np.float32)  # reused: one buffer, however many boxes
    name = sess.get_inputs()[0].name
    for start in range(0, len(boxes), per_run):
        count = min(per_run, len(boxes) - start)
        for i in range(count):
            crop = cv2.warpAffine(img, matrices[start + i], (out_w, out_h), flags=cv2.INTER_LINEAR)
            for c in range(3):
                np.take(_NORMALISE[c], crop[:, :, c], out=batch[i, c])
        simcc_x, simcc_y = sess.run(None, {name: batch[:count]})[:2]
        if start == 0:  # the keypoint count comes from the model's output
            locs = np.empty((len(boxes), simcc_x.shape[1], 2), dtype=np.float32)
            scores = np.empty((len(boxes), simcc_x.shape[1]), dtype=np.float32)
        # decoded at once, so no box's SimCC vectors outlive its run
        locs[start:start + count, :, 0] = simcc_x.argmax(axis=2)
        locs[start:start + count, :, 1] = simcc_y.argmax(axis=2)
        scores[start:start + count] = np.minimum(simcc_x.max(axis=2), simcc_y.max(axis=2))
    locs[scores <= 0.0] = -1
    locs /= _SIMCC_SPLIT
    points = locs / np.array([out_w, out_h]) * scales[:, None] + centers[:, None] - scales[:, None] / 2
    return points, scores


def _boxes_per_run(sess, boxes: int) -> int:
    """All boxes in one run on a GPU; one at a time on the CPU, where batching them was measured no faster
    (within noise, two cores, 6 boxes) and the batch's input and outputs grow with every box (38 MB for 29)."""
    if sess.get_inputs()[0].shape[0] == 1 or sess.get_providers()[0] == "CPUExecutionProvider":
        return 1
    return max(1, boxes)
