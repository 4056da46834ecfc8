"""mediapipe_face: MediaPipe's face mesh (478 landmarks with irises) drawn as the other WebUI ControlNet extension
draws it (face oval, eyes, eyebrows, lips and pupils in its colours), through controlnet-aux's MediapipeFace code.

MediaPipe ships its own face models inside the package, so there is no weight file. It is an optional package:
the WebUI holds protobuf at 3.20.0, mediapipe 0.10.13 and later need protobuf >= 4.25, and 0.10.30 and later have
no `mp.solutions` face mesh at all. 0.10.9 imports and runs beside the WebUI's pins (protobuf 3.20.0, numpy < 2);
its declared opencv-contrib-python would be a second OpenCV in the WebUI's venv, hence `--no-deps`.
"""
from __future__ import annotations

import threading

import numpy as np

from annotators.common import Params
from lib_controlnet.errors import UserError

INSTALL = "pip install --no-deps mediapipe==0.10.9 absl-py"


def _drawing():
    try:
        import mediapipe
    except ImportError:
        raise UserError(f"mediapipe_face needs the mediapipe package, which is not installed: run `{INSTALL}` "
                        "in the WebUI's Python environment (later mediapipe versions need a protobuf newer than "
                        "the WebUI's 3.20.0).") from None
    if not hasattr(mediapipe, "solutions"):  # removed in 0.10.30
        raise UserError(f"mediapipe {getattr(mediapipe, '__version__', '?')} has no face mesh (mp.solutions was "
                        f"removed in 0.10.30); run `{INSTALL}` in the WebUI's Python environment.")
    from annotators.runtime import aux_module

    return aux_module("mediapipe_face.mediapipe_face_common")


_lock = threading.Lock()
_mesh: dict = {}  # the one FaceMesh kept: (max faces, confidence) -> graph


def _face_mesh(common, max_faces: int, confidence: float):
    """A FaceMesh graph kept between calls: building one (graph and TFLite models) cost as much as running it,
    and controlnet-aux builds one per image. In static-image mode each call detects afresh, so a kept graph
    gives the same landmarks. Only the last settings' graph is kept (each holds its own models)."""
    key = (max_faces, confidence)
    if key not in _mesh:
        for old in _mesh.values():
            old.close()
        _mesh.clear()
        _mesh[key] = common.mp_face_mesh.FaceMesh(static_image_mode=True, max_num_faces=max_faces,
                                                  refine_landmarks=True, min_detection_confidence=confidence)
    return _mesh[key]


def mediapipe_face(img: np.ndarray, p: Params) -> np.ndarray:
    common = _drawing()
    img = np.ascontiguousarray(img)
    with _lock:  # one graph, one caller at a time
        faces = _face_mesh(common, int(p.threshold_a), float(p.threshold_b)).process(img).multi_face_landmarks
    canvas = np.zeros_like(img)
    h, w = img.shape[:2]
    for face in faces or ():
        xs = [point.x for point in face.landmark]
        ys = [point.y for point in face.landmark]
        if min((max(xs) - min(xs)) * w, (max(ys) - min(ys)) * h) < common.min_face_size_pixels:
            continue  # their rule: faces under 64 px are not drawn
        # their drawing, in their colours (given as BGR: the canvas is flipped to RGB at the end, as theirs is)
        common.mp_drawing.draw_landmarks(canvas, face, connections=common.face_connection_spec.keys(),
                                         landmark_drawing_spec=None,
                                         connection_drawing_spec=common.face_connection_spec)
        common.draw_pupils(canvas, face, common.iris_landmark_spec, 2)
    return np.ascontiguousarray(canvas[:, :, ::-1])
