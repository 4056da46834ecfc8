"""dw_openpose_full and animal_openpose: our onnxruntime pipeline against the published DWPose ONNX pipeline, on
small ONNX files saved under the real names (annotators.random_onnx), through the real loading code.

The reference below is the published pipeline written out plainly, step for step (YOLOX letterbox and grid
decoding, class-aware NMS over all 80 classes, one affine crop, float64 normalisation and one pose-model run
per box, SimCC arg-max decoding, the neck and the MMPose -> OpenPose reordering; AP-10K limbs drawn with
cv2.line); controlnet-aux 0.0.10's dwpose needs mmpose/mmdet, which do not install beside the WebUI's pins.
"""
import json

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from annotators import dwpose, random_onnx
from annotators.runtime import unload_all
from annotators.weights import AnnotatorWeightsError
from lib_controlnet import preprocess
from lib_controlnet.cli import main
from lib_controlnet.settings import get_settings, update_settings


def _scene(height=512, width=640):
    img = np.zeros((height, width, 3), np.uint8)
    img[60:380, 120:220, 0] = 230  # two people (red: the small detector's person colour)
    img[80:360, 380:450, 0] = 220
    img[400:500, 300:560, 1] = 230  # a dog (green)
    img += np.random.default_rng(0).integers(0, 20, img.shape, dtype=np.uint8)
    return img


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("onnx")
    random_onnx.write(directory)
    saved = get_settings().annotator_models_path, get_settings().allow_annotator_downloads
    update_settings(annotator_models_path=directory, allow_annotator_downloads=False)
    unload_all()
    yield directory
    unload_all()
    update_settings(annotator_models_path=saved[0], allow_annotator_downloads=saved[1])


# ---------------------------------------------------------------- the published pipeline, written out


def _ref_boxes(path, img, wanted):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    padded = np.ones((640, 640, 3), np.uint8) * 114
    r = min(640 / img.shape[0], 640 / img.shape[1])
    small = cv2.resize(img, (int(img.shape[1] * r), int(img.shape[0] * r)), interpolation=cv2.INTER_LINEAR)
    padded[:small.shape[0], :small.shape[1]] = small
    out = sess.run(None, {"images": np.ascontiguousarray(padded.transpose(2, 0, 1), dtype=np.float32)[None]})[0]
    grids, strides = [], []
    for s in (8, 16, 32):
        xv, yv = np.meshgrid(np.arange(640 // s), np.arange(640 // s))
        grids.append(np.stack((xv, yv), 2).reshape(1, -1, 2))
        strides.append(np.full((1, grids[-1].shape[1], 1), s))
    out[..., :2] = (out[..., :2] + np.concatenate(grids, 1)) * np.concatenate(strides, 1)
    out[..., 2:4] = np.exp(out[..., 2:4]) * np.concatenate(strides, 1)
    pred = out[0]
    scores = pred[:, 4:5] * pred[:, 5:]
    boxes = np.ones_like(pred[:, :4])
    boxes[:, 0] = pred[:, 0] - pred[:, 2] / 2.
    boxes[:, 1] = pred[:, 1] - pred[:, 3] / 2.
    boxes[:, 2] = pred[:, 0] + pred[:, 2] / 2.
    boxes[:, 3] = pred[:, 1] + pred[:, 3] / 2.
    boxes /= r
    dets = []
    for c in range(scores.shape[1]):
        valid = scores[:, c] > 0.1
        if not valid.any():
            continue
        b, sc = boxes[valid], scores[valid, c]
        areas = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
        order, keep = sc.argsort()[::-1], []
        while order.size:
            i = order[0]
            keep.append(i)
            rest = order[1:]
            iw = np.maximum(0.0, np.minimum(b[i, 2], b[rest, 2]) - np.maximum(b[i, 0], b[rest, 0]) + 1)
            ih = np.maximum(0.0, np.minimum(b[i, 3], b[rest, 3]) - np.maximum(b[i, 1], b[rest, 1]) + 1)
            iou = iw * ih / (areas[i] + areas[rest] - iw * ih)
            order = rest[iou <= 0.45]
        dets.append(np.concatenate([b[keep], sc[keep, None], np.full((len(keep), 1), c)], 1))
    if not dets:
        return None
    dets = np.concatenate(dets)
    return dets[(dets[:, 4] > 0.3) & np.isin(dets[:, 5], wanted), :4]


def _ref_keypoints(path, img, boxes, w, h):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if len(boxes) == 0:
        boxes = [[0, 0, img.shape[1], img.shape[0]]]
    points, scores = [], []
    for box in boxes:
        box = np.array(box, dtype=np.float64)
        center = (box[:2] + box[2:]) * 0.5
        scale = (box[2:] - box[:2]) * 1.25
        scale = np.array([scale[0], scale[0] / (w / h)]) if scale[0] > scale[1] * (w / h) \
            else np.array([scale[1] * (w / h), scale[1]])
        src = np.zeros((3, 2), np.float32)
        dst = np.zeros((3, 2), np.float32)
        src[0], src[1] = center, center + np.array([0.0, scale[0] * -0.5])
        src[2] = src[1] + np.r_[-(src[0] - src[1])[1], (src[0] - src[1])[0]]
        dst[0], dst[1] = [w * 0.5, h * 0.5], np.array([w * 0.5, h * 0.5]) + np.array([0.0, w * -0.5])
        dst[2] = dst[1] + np.r_[-(dst[0] - dst[1])[1], (dst[0] - dst[1])[0]]
        crop = cv2.warpAffine(img, cv2.getAffineTransform(src, dst), (w, h), flags=cv2.INTER_LINEAR)
        crop = (crop - np.array([123.675, 116.28, 103.53])) / np.array([58.395, 57.12, 57.375])
        sx, sy = sess.run(None, {"input": crop.transpose(2, 0, 1)[None].astype(np.float32)})
        locs = np.stack([sx[0].argmax(1), sy[0].argmax(1)], -1).astype(np.float32)
        vals = np.minimum(sx[0].max(1), sy[0].max(1))
        locs[vals <= 0] = -1
        points.append(locs / 2.0 / (w, h) * scale + center - scale / 2)
        scores.append(vals)
    return np.array(points), np.array(scores)


def _ref_whole_body(directory, img):
    boxes = _ref_boxes(directory / random_onnx.DETECTOR, img, [0])
    if boxes is None:
        return None
    points, scores = _ref_keypoints(directory / random_onnx.WHOLE_BODY, img, boxes, 288, 384)
    info = np.concatenate([points, scores[..., None]], -1)
    neck = info[:, [5, 6]].mean(1)
    neck[:, 2] = (info[:, 5, 2] > 0.3) & (info[:, 6, 2] > 0.3)
    info = np.insert(info, 17, neck, 1)
    info[:, [1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17]] = \
        info[:, [17, 6, 8, 10, 7, 9, 12, 14, 16, 13, 15, 2, 1, 4, 3]]
    return info


# ---------------------------------------------------------------- people


@pytest.mark.parametrize("case", ["people", "nothing", "no confident box"])
def test_dwpose_equals_the_published_pipeline(onnx_dir, case):
    img = {"people": _scene(), "nothing": np.zeros((384, 384, 3), np.uint8),
           "no confident box": np.full((384, 384, 3), 114, np.uint8)}[case]
    ours, reference = dwpose.whole_body(img), _ref_whole_body(onnx_dir, img)
    if case == "nothing":  # no candidate anywhere: nobody
        assert ours is None and reference is None
        return
    # several people found; with candidates but no confident box the whole image is read as one person
    assert len(ours) == len(reference) == (1 if case == "no confident box" else len(ours)) and len(ours) >= 1
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-3)
    if case == "people":
        assert len(ours) >= 2


def test_dw_openpose_full_gives_openpose_json_and_map(onnx_dir):
    img = _scene()
    canvas, keypoints = preprocess.run_pose("dw_openpose_full", img, resolution=512)
    info = _ref_whole_body(onnx_dir, img)
    people = keypoints["people"]
    assert (keypoints["canvas_height"], keypoints["canvas_width"]) == (512, 640)
    assert len(people) == len(info)
    for person, ref in zip(people, info):
        body = np.array(person["pose_keypoints_2d"]).reshape(18, 3)
        # OpenPose JSON leaves out what is not shown and what lies off the canvas's top or left (as openpose_full)
        shown = (ref[:18, 2] >= 0.3) & (ref[:18, :2] >= 0).all(axis=1)
        np.testing.assert_allclose(body[shown, :2], ref[:18][shown, :2], atol=1e-3)
        assert (body[~shown] == 0).all()
        for key, rows in (("hand_left_keypoints_2d", ref[92:113]), ("hand_right_keypoints_2d", ref[113:134])):
            if person[key] is None:
                assert (rows[:, 2] < 0.3).all()
            else:
                assert len(person[key]) == 21 * 3
        assert person["face_keypoints_2d"] is None or len(person["face_keypoints_2d"]) == 70 * 3
    # the map is openpose_full's drawing of the same people (controlnet-aux draws both)
    from annotators import pose
    assert np.array_equal(canvas, pose.draw(dwpose.to_poses(info, 512, 640), 512, 640, True, True, True))
    assert canvas.any()
    assert np.array_equal(preprocess.run("dw_openpose_full", img, resolution=512, use_cache=False), canvas)


def test_pose_files_exported_for_one_box_at_a_time_give_the_same_people(onnx_dir, tmp_path):
    random_onnx.write(tmp_path, dynamic_batch=False)
    img = _scene()
    batched = dwpose.whole_body(img)
    update_settings(annotator_models_path=tmp_path)
    try:
        single = dwpose.whole_body(img)
    finally:
        update_settings(annotator_models_path=onnx_dir)
    np.testing.assert_allclose(single, batched, atol=1e-3)


# ---------------------------------------------------------------- animals


def test_animal_openpose_equals_the_published_pipeline(onnx_dir):
    img = _scene()
    canvas, keypoints = preprocess.run_pose("animal_openpose", img, resolution=512)
    boxes = _ref_boxes(onnx_dir / random_onnx.DETECTOR, img, list(range(14, 24)))
    points, scores = _ref_keypoints(onnx_dir / random_onnx.ANIMAL, img, boxes, 256, 256)
    assert len(boxes) >= 1 and keypoints["version"] == "ap10k"
    animals = np.array(keypoints["animals"])
    assert animals.shape == (len(boxes), 17, 3)
    np.testing.assert_allclose(animals[..., :2], points, atol=1e-3)
    np.testing.assert_allclose(animals[..., 2], np.clip(scores, 0, 1), atol=1e-5)
    expected = np.zeros_like(canvas)
    limbs = [(1, 2), (2, 3), (1, 3), (3, 4), (4, 9), (9, 10), (10, 11), (4, 6), (6, 7), (7, 8), (4, 5), (5, 15),
             (15, 16), (16, 17), (5, 12), (12, 13), (13, 14)]
    colours = [(255, 255, 255), (100, 255, 100), (150, 255, 255), (100, 50, 255), (50, 150, 200), (0, 255, 255),
               (0, 150, 0), (0, 0, 255), (0, 0, 150), (255, 50, 255), (255, 0, 255), (255, 0, 0), (150, 0, 0),
               (255, 255, 100), (0, 150, 0), (255, 255, 0), (150, 150, 150)]
    for animal in points:
        for (a, b), colour in zip(limbs, colours):
            cv2.line(expected, tuple(int(v) for v in animal[a - 1]), tuple(int(v) for v in animal[b - 1]), colour, 5)
    assert np.array_equal(canvas, expected) and canvas.any()
    # no animal in the picture: no animals in the JSON, an empty map
    empty, nothing = preprocess.run_pose("animal_openpose", np.zeros((256, 256, 3), np.uint8), resolution=256)
    assert nothing["animals"] == [] and not empty.any()


# ---------------------------------------------------------------- what a user sees


def test_registry_lists_them_under_openpose():
    for name in ("dw_openpose_full", "animal_openpose"):
        assert name in preprocess.list_modules() and name in preprocess.list_modules(alias_names=True)
        assert name in preprocess.control_types()["OpenPose"]["module_list"]
        assert preprocess.module_detail()[name]["needs_weights"]


def test_cli_writes_the_map_and_the_openpose_json(onnx_dir, tmp_path):
    source = tmp_path / "people.png"
    cv2.imwrite(str(source), _scene()[:, :, ::-1])
    out, keypoints = tmp_path / "pose.png", tmp_path / "pose.json"
    assert main(["detect", "--module", "dw_openpose_full", "--res", "512", "--annotator-dir", str(onnx_dir),
                 "--pose-json", str(keypoints), str(source), str(out)]) == 0
    people = json.loads(keypoints.read_text())["people"]
    assert len(people) >= 2 and cv2.imread(str(out)).any()


def test_missing_and_broken_files_are_one_sentence(onnx_dir, tmp_path):
    update_settings(annotator_models_path=tmp_path)
    try:
        with pytest.raises(AnnotatorWeightsError) as missing:
            preprocess.run("dw_openpose_full", _scene(), use_cache=False)
        message = str(missing.value)
        assert "yolox_l.onnx" in message and str(tmp_path) in message and "yzd-v/DWPose" in message
        assert message.count(". ") == 0 and "\n" not in message
        random_onnx.write(tmp_path, names=[random_onnx.DETECTOR])
        with pytest.raises(AnnotatorWeightsError, match="rtmpose-m_ap10k_256.onnx.*hr16/UnJIT-DWPose"):
            preprocess.run("animal_openpose", _scene(), use_cache=False)
        (tmp_path / random_onnx.ANIMAL).write_bytes(b"<html>not a model</html>")
        with pytest.raises(AnnotatorWeightsError, match="is not a readable ONNX model .*replace it"):
            preprocess.run("animal_openpose", _scene(), use_cache=False)
    finally:
        update_settings(annotator_models_path=onnx_dir)
        unload_all()
