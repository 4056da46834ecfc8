"""mediapipe_face: MediaPipe's face mesh (478 landmarks with irises) drawn as the other WebUI ControlNet extension
draws it (face oval, eyes, eyebrows, lips and pupils in its colours), through controlnet-aux's MediapipeFace code.

MediaPipe ships its own face models inside the package, so there is no weight file. It is an optional package:
the WebUI holds protobuf at 3.20.0, mediapipe 0.10.13 and later need protobuf >= 4.25, and 0.10.30 and later have
no `mp.solutions` face mesh at all. 0.10.9 imports and runs beside the WebUI's pins (protobuf 3.20.0, numpy < 2);
its declared opencv-contrib-python would be a second OpenCV in the WebUI's venv, hence `--no-deps`.
"""
from __future__ import annotations

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


def mediapipe_face(img: np.ndarray, p: Params) -> np.ndarray:
    return _drawing().generate_annotation(np.ascontiguousarray(img), int(p.threshold_a), float(p.threshold_b))
