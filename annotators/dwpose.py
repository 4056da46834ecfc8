"""dw_openpose_full (DWPose: yolox_l.onnx + dw-ll_ucoco_384.onnx) and animal_openpose (yolox_l.onnx +
rtmpose-m_ap10k_256.onnx), both through onnxruntime (annotators.onnx_pose says why not controlnet-aux).

DWPose's 133 whole-body keypoints are mapped onto OpenPose's 18 body points (a neck is added between the
shoulders), 70 face points (DWPose's 68 plus the two eyes) and 21 per hand, so the map is drawn and the JSON
written exactly as for openpose_full. Animals are drawn as the other WebUI ControlNet extension draws AP-10K's
17 points, and their JSON is its `{"version": "ap10k", "animals": [...]}`.
"""
from __future__ import annotations

import cv2
import numpy as np

from annotators import onnx_pose
from annotators.common import Params
from annotators.runtime import aux_module
from annotators.weights import find_weight

PERSON = (0,)
ANIMALS = tuple(range(14, 24))  # COCO bird, cat, dog, horse, sheep, cow, elephant, bear, zebra, giraffe
_KEEP = 0.3  # keypoints scoring below this are left out of the map and the JSON

# MMPose's COCO body order (with the added neck at 17) -> OpenPose's body order
_MMPOSE = [17, 6, 8, 10, 7, 9, 12, 14, 16, 13, 15, 2, 1, 4, 3]
_OPENPOSE = [1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17]

# AP-10K limbs (1-based keypoint numbers) and the colour each is drawn in
_AP10K_LIMBS = [(1, 2), (2, 3), (1, 3), (3, 4), (4, 9), (9, 10), (10, 11), (4, 6), (6, 7), (7, 8), (4, 5), (5, 15),
                (15, 16), (16, 17), (5, 12), (12, 13), (13, 14)]
_AP10K_COLOURS = [(255, 255, 255), (100, 255, 100), (150, 255, 255), (100, 50, 255), (50, 150, 200), (0, 255, 255),
                  (0, 150, 0), (0, 0, 255), (0, 0, 150), (255, 50, 255), (255, 0, 255), (255, 0, 0), (150, 0, 0),
                  (255, 255, 100), (0, 150, 0), (255, 255, 0), (150, 150, 150)]
_LIMB_WIDTH = 5


def _sessions(pose_file: str, label: str):
    detector = onnx_pose.session(find_weight("yolox_l.onnx", label))
    return detector, onnx_pose.session(find_weight(pose_file, label))


def whole_body(img: np.ndarray) -> np.ndarray | None:
    """(people, 134, 3) x, y (pixels), score in OpenPose body order followed by DWPose's feet, face and hands;
    None where the detector saw nothing at all."""
    detector, pose = _sessions("dw-ll_ucoco_384.onnx", "dw_openpose_full")
    boxes = onnx_pose.detect_boxes(detector, img, PERSON)
    if boxes is None:
        return None
    points, scores = onnx_pose.keypoints(pose, img, boxes, fallback_hw=(384, 288))
    info = np.concatenate([points, scores[..., None]], axis=-1)
    neck = np.mean(info[:, [5, 6]], axis=1)
    neck[:, 2] = np.logical_and(info[:, 5, 2] > _KEEP, info[:, 6, 2] > _KEEP)
    info = np.insert(info, 17, neck, axis=1)
    info[:, _OPENPOSE] = info[:, _MMPOSE]
    return info


def _part(rows: np.ndarray, width: int, height: int, absent=None):
    """Keypoints (0..1) of one part, `absent` for those below the score threshold; None where all are absent.
    controlnet-aux draws hands and faces only from keypoints (its own detector marks a missing one at -1, -1),
    bodies from keypoints or None."""
    keypoint = aux_module("open_pose.body").Keypoint
    points = [keypoint(x / width, y / height, score, i) if score >= _KEEP else absent
              for i, (x, y, score) in enumerate(rows.tolist())]
    return None if all(p is absent for p in points) else points


def to_poses(info: np.ndarray | None, height: int, width: int) -> list:
    """controlnet-aux PoseResults (coordinates 0..1), as openpose_full's detector returns them."""
    body_module = aux_module("open_pose.body")
    pose_result = aux_module("open_pose").PoseResult
    absent = body_module.Keypoint(-1.0, -1.0, 0.0)
    poses = []
    for person in [] if info is None else info:
        body = _part(person[:18], width, height) or [None] * 18
        face = _part(person[24:92], width, height, absent)
        if face is not None:
            face += [body[14] or absent, body[15] or absent]  # OpenPose's face has the eyes as points 68, 69
        total = sum(p.score for p in body if p is not None)
        poses.append(pose_result(body_module.BodyResult(body, total, len(body)),
                                 _part(person[92:113], width, height, absent),
                                 _part(person[113:134], width, height, absent), face))
    return poses


def _dw_map_and_json(img: np.ndarray) -> tuple[np.ndarray, dict]:
    from annotators import pose

    h, w = img.shape[:2]
    poses = to_poses(whole_body(img), h, w)
    return pose.draw(poses, h, w, True, True, True), pose.pose_json(poses, h, w)


def dw_openpose_full(img: np.ndarray, p: Params) -> np.ndarray:
    return _dw_map_and_json(img)[0]


dw_openpose_full.with_json = _dw_map_and_json


def animals(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(animals, 17, 2) AP-10K keypoints in pixels and (animals, 17) scores."""
    detector, pose = _sessions("rtmpose-m_ap10k_256.onnx", "animal_openpose")
    boxes = onnx_pose.detect_boxes(detector, img, ANIMALS)
    if boxes is None:
        return np.zeros((0, 17, 2)), np.zeros((0, 17))
    return onnx_pose.keypoints(pose, img, boxes, fallback_hw=(256, 256))


def draw_animals(points: np.ndarray, height: int, width: int) -> np.ndarray:
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    for animal in points:
        for (a, b), colour in zip(_AP10K_LIMBS, _AP10K_COLOURS):
            start, end = animal[a - 1], animal[b - 1]
            cv2.line(canvas, (int(start[0]), int(start[1])), (int(end[0]), int(end[1])), colour, _LIMB_WIDTH)
    return canvas


def _animal_map_and_json(img: np.ndarray) -> tuple[np.ndarray, dict]:
    h, w = img.shape[:2]
    points, scores = animals(img)
    rows = np.concatenate([points, np.clip(scores, 0.0, 1.0)[..., None]], axis=-1)
    keypoints = {"version": "ap10k", "animals": rows.tolist(), "canvas_height": int(h), "canvas_width": int(w)}
    return draw_animals(points, h, w), keypoints


def animal_openpose(img: np.ndarray, p: Params) -> np.ndarray:
    return _animal_map_and_json(img)[0]


animal_openpose.with_json = _animal_map_and_json
