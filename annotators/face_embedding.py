"""Face identity embeddings for IP-Adapter FaceID, from insightface's ONNX models run with onnxruntime (no
insightface build needed).

The models are insightface's model packs as users have them from the other WebUI ControlNet extension
(`<annotator dir>/insightface/models/buffalo_l/`): the SCRFD detector `det_10g.onnx` and the ArcFace recogniser
`w600k_r50.onnx`; antelopev2's `scrfd_10g_bnkps.onnx` + `glintr100.onnx` are used when buffalo_l is absent.
The steps are insightface's FaceAnalysis ones:
- detect at 640x640: the image scaled to fit, pasted top-left on black, (x - 127.5) / 128; per stride 8, 16, 32
  the scores, box distances and keypoint offsets (in stride units) of two anchors per cell; score >= 0.5, then
  non-maximum suppression at IoU 0.4; the face with the best score is taken;
- align: the similarity transform (least squares, Umeyama) from its five keypoints onto ArcFace's 112x112
  template (FaceID plus also takes the face aligned onto the template scaled to 224x224 for CLIP);
  recognise: (x - 127.5) / 127.5, the embedding divided by its norm (`normed_embedding`).
Images are RGB here, which is what insightface feeds its networks after swapping BGR.
"""
from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np

from annotators.weights import AnnotatorWeightsError, WeightFile, _search, annotator_dir

PACKS = {"buffalo_l": ("det_10g.onnx", "w600k_r50.onnx"), "antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx")}
DET_SIZE, SCORE_THRESHOLD, NMS_THRESHOLD = 640, 0.5, 0.4
STRIDES, ANCHORS = (8, 16, 32), 2
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                             [70.7299, 92.2041]], dtype=np.float32)


class NoFaceError(AnnotatorWeightsError):
    """No face found in an image given to a FaceID unit."""


def find_models() -> tuple[Path, Path]:
    root = annotator_dir()
    for pack, names in PACKS.items():
        found = [_search(root, WeightFile(name, f"insightface/models/{pack}")) for name in names]
        if all(found):
            return found[0], found[1]
    raise AnnotatorWeightsError(
        f"The ip-adapter_face_id preprocessor needs insightface's face models det_10g.onnx and w600k_r50.onnx "
        f"(the buffalo_l pack): put them in {root / 'insightface' / 'models' / 'buffalo_l'}.")


_lock = threading.Lock()
_sessions: dict = {}


def _session(path: Path):
    import onnxruntime

    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    with _lock:
        if key not in _sessions:
            _sessions.clear()  # one pack at a time
            _sessions[key] = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return _sessions[key]


def _nms(boxes: np.ndarray, threshold: float) -> list[int]:
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order, keep = np.arange(len(boxes)), []
    while order.size:
        i = order[0]
        keep.append(int(i))
        w = np.maximum(0.0, np.minimum(x2[i], x2[order[1:]]) - np.maximum(x1[i], x1[order[1:]]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[order[1:]]) - np.maximum(y1[i], y1[order[1:]]) + 1)
        overlap = w * h / (areas[i] + areas[order[1:]] - w * h)
        order = order[1:][overlap <= threshold]
    return keep


def detect(session, image: np.ndarray) -> list[tuple[float, np.ndarray, np.ndarray]]:
    """(score, box x1 y1 x2 y2, 5x2 keypoints) per face in `image` (HxWx3 RGB uint8), best score first."""
    height, width = image.shape[:2]
    if height > width:
        new_h, new_w = DET_SIZE, max(int(DET_SIZE * width / height), 1)
    else:
        new_w, new_h = DET_SIZE, max(int(DET_SIZE * height / width), 1)
    scale = new_h / height
    canvas = np.zeros((DET_SIZE, DET_SIZE, 3), np.float32)
    canvas[:new_h, :new_w] = cv2.resize(image, (new_w, new_h)).astype(np.float32)
    blob = ((canvas - 127.5) / 128.0).transpose(2, 0, 1)[None]
    outputs = session.run(None, {session.get_inputs()[0].name: blob})
    if len(outputs) != 3 * len(STRIDES):
        raise AnnotatorWeightsError("The face detector is not an SCRFD model with keypoints (nine outputs).")
    outputs = [o[0] if o.ndim == 3 else o for o in outputs]  # batched exports carry a leading 1
    scores, boxes, points = [], [], []
    for level, stride in enumerate(STRIDES):
        cells = DET_SIZE // stride
        grid = np.stack(np.mgrid[:cells, :cells][::-1], axis=-1).reshape(-1, 2).astype(np.float32) * stride
        centers = np.repeat(grid, ANCHORS, axis=0)
        score = outputs[level].reshape(-1)
        keep = score >= SCORE_THRESHOLD
        distance = outputs[level + 3].reshape(-1, 4)[keep] * stride
        offsets = outputs[level + 6].reshape(-1, 10)[keep] * stride
        c = centers[keep]
        scores.append(score[keep])
        boxes.append(np.concatenate([c - distance[:, :2], c + distance[:, 2:]], axis=1))
        points.append((np.tile(c, 5) + offsets).reshape(-1, 5, 2))
    scores, boxes, points = np.concatenate(scores), np.concatenate(boxes), np.concatenate(points)
    order = np.argsort(-scores, kind="stable")
    scores, boxes, points = scores[order], boxes[order] / scale, points[order] / scale
    return [(float(scores[i]), boxes[i], points[i]) for i in _nms(boxes, NMS_THRESHOLD)]


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """2x3 least-squares similarity (rotation, uniform scale, shift) taking `source` points onto `target`."""
    mean_s, mean_t = source.mean(axis=0), target.mean(axis=0)
    s, t = source - mean_s, target - mean_t
    u, sigma, vt = np.linalg.svd(t.T @ s / len(source))
    d = np.diag([1.0, np.sign(np.linalg.det(u @ vt)) or 1.0])
    rotation = u @ d @ vt
    scale = np.trace(np.diag(sigma) @ d) / (s ** 2).sum(axis=1).mean()
    matrix = np.zeros((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = mean_t - scale * rotation @ mean_s
    return matrix


def norm_crop(image: np.ndarray, points: np.ndarray, size: int) -> np.ndarray:
    """The face aligned onto ArcFace's template scaled to `size` (a multiple of 112), as insightface's
    norm_crop: FaceID plus encodes this 224x224 crop with CLIP."""
    template = ARCFACE_TEMPLATE.astype(np.float64) * (size / 112.0)
    matrix = similarity_transform(points.astype(np.float64), template)
    return cv2.warpAffine(image, matrix, (size, size), borderValue=0.0)


def analyse(images, crop_size: int | None = None) -> tuple[np.ndarray, list]:
    """(N, D) unit-norm identity embeddings, one per image (its best-scoring face), and, when `crop_size` is
    given, that face aligned and cropped to crop_size x crop_size (RGB uint8) per image."""
    det_path, rec_path = find_models()
    detector, recogniser = _session(det_path), _session(rec_path)
    out, crops = [], []
    for index, image in enumerate(images):
        image = np.ascontiguousarray(np.asarray(image)[..., :3])
        faces = detect(detector, image)
        if not faces:
            raise NoFaceError(f"No face was found in image {index + 1} of the IP-Adapter FaceID unit.")
        crop = norm_crop(image, faces[0][2], 112).astype(np.float32)
        blob = ((crop - 127.5) / 127.5).transpose(2, 0, 1)[None]
        vector = recogniser.run(None, {recogniser.get_inputs()[0].name: blob})[0].reshape(-1)
        out.append(vector / np.linalg.norm(vector))
        if crop_size:
            crops.append(norm_crop(image, faces[0][2], crop_size))
    return np.stack(out).astype(np.float32), crops


def embed(images) -> np.ndarray:
    """(N, D) unit-norm identity embeddings, one per image (its best-scoring face)."""
    return analyse(images)[0]
