"""dw_openpose_full and animal_openpose: our onnxruntime pipeline against the published DWPose ONNX pipeline, on
small ONNX files saved under the real names (annotators.random_onnx), through the real loading code.

The reference (dwpose_reference.py) is the published pipeline written out plainly; controlnet-aux 0.0.10's
dwpose needs mmpose/mmdet, which do not install beside the WebUI's pins.
"""
import json
import sys

import cv2
import numpy as np
import pytest

import dwpose_reference as reference
from annotator_settings import annotator_folder
from annotators import dwpose, random_onnx
from annotators.runtime import unload_all
from annotators.weights import AnnotatorWeightsError
from lib_controlnet import preprocess
from lib_controlnet.cli import main
from lib_controlnet.settings import update_settings


def _scene(height=512, width=640, noise=True):
    img = np.zeros((height, width, 3), np.uint8)
    img[60:380, 120:220, 0] = 230  # two people (red: the small detector's person colour)
    img[80:360, 380:450, 0] = 220
    img[400:500, 300:560, 1] = 230  # a dog (green)
    if noise:
        img += np.random.default_rng(0).integers(0, 20, img.shape, dtype=np.uint8)
    return img


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("onnx")
    random_onnx.write(directory)
    with annotator_folder(directory, allow_annotator_downloads=False):
        yield directory


# ---------------------------------------------------------------- people


@pytest.mark.parametrize("case", ["people", "equal scores", "nothing", "no confident box"])
def test_dwpose_equals_the_published_pipeline(onnx_dir, case):
    # equal scores: flat colours give many anchors the very same score, so NMS's order among them matters
    img = {"people": _scene(), "equal scores": _scene(noise=False), "nothing": np.zeros((384, 384, 3), np.uint8),
           "no confident box": np.full((384, 384, 3), 114, np.uint8)}[case]
    ours, expected = dwpose.whole_body(img), reference.whole_body(onnx_dir, img)
    if case == "nothing":  # no candidate anywhere: nobody
        assert ours is None and expected is None
        return
    # several people found; with candidates but no confident box the whole image is read as one person
    assert len(ours) == len(expected) == (1 if case == "no confident box" else len(ours)) and len(ours) >= 1
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-3)
    if case in ("people", "equal scores"):
        assert len(ours) >= 2


def test_dw_openpose_full_gives_openpose_json_and_map(onnx_dir):
    img = _scene()
    canvas, keypoints = preprocess.run_pose("dw_openpose_full", img, resolution=512)
    info = reference.whole_body(onnx_dir, img)
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


# ---------------------------------------------------------------- animals


def test_animal_openpose_equals_the_published_pipeline(onnx_dir):
    img = _scene()
    canvas, keypoints = preprocess.run_pose("animal_openpose", img, resolution=512)
    boxes = reference.boxes(onnx_dir / random_onnx.DETECTOR, img, list(range(14, 24)))
    points, scores = reference.keypoints(onnx_dir / random_onnx.ANIMAL, img, boxes, 256, 256)
    assert len(boxes) >= 1 and keypoints["version"] == "ap10k"
    animals = np.array(keypoints["animals"])
    assert animals.shape == (len(boxes), 17, 3)
    np.testing.assert_allclose(animals[..., :2], points, atol=1e-3)
    np.testing.assert_allclose(animals[..., 2], np.clip(scores, 0, 1), atol=1e-5)
    expected = reference.draw_animals(points, *canvas.shape[:2])
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


def test_missing_and_broken_files_are_one_sentence(onnx_dir, tmp_path, monkeypatch):
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
        unload_all()
        with monkeypatch.context() as patch:
            patch.setitem(sys.modules, "onnxruntime", None)  # what a venv without it raises on import
            with pytest.raises(AnnotatorWeightsError, match="yolox_l.onnx runs through onnxruntime, which is not "
                                                            "installed: pip install onnxruntime"):
                preprocess.run("dw_openpose_full", _scene(), use_cache=False)
    finally:
        update_settings(annotator_models_path=onnx_dir)
        unload_all()


def test_http_detect_answers_the_keypoints_and_fidelity_reads_them(onnx_dir):
    """POST /controlnet/detect over real HTTP (uvicorn on 127.0.0.1) returns `poses` for both modules, as the
    other extension's route does for its openpose modules; the fidelity score reads both JSON kinds."""
    import base64
    import io
    import socket
    import threading
    import time

    import requests
    import uvicorn
    from fastapi import FastAPI
    from PIL import Image

    from lib_controlnet import api, fidelity

    app = FastAPI()
    api.register_routes(app)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    buffer = io.BytesIO()
    Image.fromarray(_scene()).save(buffer, format="PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    try:
        for module, key in (("dw_openpose_full", "people"), ("animal_openpose", "animals")):
            answer = requests.post(f"http://127.0.0.1:{port}/controlnet/detect", timeout=120, json={
                "controlnet_module": module, "controlnet_input_images": [image],
                "controlnet_processor_res": 512}).json()
            poses = answer["poses"][0]
            assert len(poses[key]) >= 1 and len(answer["images"]) == 1, answer.get("detail")
            same = fidelity.Observation(np.zeros((8, 8, 3), np.uint8), poses)
            assert fidelity.pose_pck(same, same) == 1.0
            assert fidelity.pose_pck(same, fidelity.Observation(same.map, {key: []})) == 0.0
    finally:
        server.should_exit = True
        thread.join(timeout=10)
