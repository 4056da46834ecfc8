"""OpenPose body / hand / face (body_pose_model.pth, hand_pose_model.pth, facenet.pth) via controlnet-aux.

Besides the drawn map, the keypoints are available as OpenPose JSON (`pose_json`): the format the WebUI
ControlNet extension's openpose editor and `/controlnet/detect` speak, with pixel coordinates on the map's canvas.
"""
from __future__ import annotations

import numpy as np

from annotators.common import Params
from annotators.runtime import aux_module, device, load_once, prepare
from annotators.weights import find_weight


def _detector():
    body = find_weight("body_pose_model.pth", "openpose")
    hand = find_weight("hand_pose_model.pth", "openpose_hand")
    face = find_weight("facenet.pth", "openpose_face")
    # os.path.join inside from_pretrained keeps absolute file names, so the three may live in different folders
    detector = aux_module("open_pose").OpenposeDetector.from_pretrained(
        str(body.parent), filename=body.name, hand_filename=str(hand), face_filename=str(face))
    for part in (detector.body_estimation, detector.hand_estimation, detector.face_estimation):
        prepare(part.model, channels_last=False)
    from annotators.openpose_body import FastBody

    detector.body_estimation = FastBody(detector.body_estimation)
    return detector


def detect(img: np.ndarray, include_body: bool, include_hand: bool, include_face: bool):
    """PoseResults (coordinates normalised to 0..1) for an HxWx3 RGB image."""
    import torch

    detector = load_once("openpose", _detector)
    with torch.inference_mode():
        return detector.detect_poses(img, include_hand=include_hand, include_face=include_face)


def draw(poses, height: int, width: int, include_body: bool, include_hand: bool, include_face: bool) -> np.ndarray:
    return aux_module("open_pose").draw_poses(poses, height, width, draw_body=include_body,
                                              draw_hand=include_hand, draw_face=include_face)


def _flatten(points, width: int, height: int) -> list[float]:
    flat: list[float] = []
    for point in points or []:
        if point is None or point.x < 0 or point.y < 0:
            flat += [0.0, 0.0, 0.0]
        else:
            flat += [float(point.x * width), float(point.y * height), float(getattr(point, "score", 1.0))]
    return flat


def pose_json(poses, height: int, width: int) -> dict:
    """OpenPose JSON: one entry per person with flat [x, y, confidence, ...] lists in canvas pixels."""
    people = []
    for pose in poses:
        people.append({
            "pose_keypoints_2d": _flatten(pose.body.keypoints, width, height),
            "face_keypoints_2d": _flatten(pose.face, width, height) if pose.face else None,
            "hand_left_keypoints_2d": _flatten(pose.left_hand, width, height) if pose.left_hand else None,
            "hand_right_keypoints_2d": _flatten(pose.right_hand, width, height) if pose.right_hand else None,
        })
    return {"people": people, "canvas_height": int(height), "canvas_width": int(width)}


def _variant(include_body: bool, include_hand: bool, include_face: bool):
    def annotate(img: np.ndarray, p: Params) -> np.ndarray:
        poses = detect(img, include_body, include_hand, include_face)
        return draw(poses, img.shape[0], img.shape[1], include_body, include_hand, include_face)

    def map_and_json(img: np.ndarray) -> tuple[np.ndarray, dict]:
        poses = detect(img, include_body, include_hand, include_face)
        h, w = img.shape[:2]
        return draw(poses, h, w, include_body, include_hand, include_face), pose_json(poses, h, w)

    annotate.flags = (include_body, include_hand, include_face)
    annotate.with_json = map_and_json  # what preprocess.run_pose calls: the map plus its keypoints
    return annotate


openpose = _variant(True, False, False)
openpose_hand = _variant(True, True, False)
openpose_face = _variant(True, False, True)
openpose_faceonly = _variant(False, False, True)
openpose_full = _variant(True, True, True)
