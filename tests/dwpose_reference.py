"""The published DWPose ONNX pipeline written out plainly, step for step, as the reference for tests/test_dwpose.py
and benchmarks/bench_pose.py: YOLOX letterbox and grid decoding, class-aware NMS over all 80 classes, one affine
crop, float64 normalisation and one pose-model run per box, SimCC arg-max decoding, the neck and the MMPose ->
OpenPose reordering; AP-10K limbs drawn with cv2.line. Each call opens its sessions unless given them.
"""
import cv2
import numpy as np
import onnxruntime as ort

DETECTOR, WHOLE_BODY, ANIMAL = "yolox_l.onnx", "dw-ll_ucoco_384.onnx", "rtmpose-m_ap10k_256.onnx"


def _session(path):
    if isinstance(path, ort.InferenceSession):
        return path
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def boxes(path, img, wanted):
    sess = _session(path)
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


def keypoints(path, img, found, w, h):
    sess = _session(path)
    if len(found) == 0:
        found = [[0, 0, img.shape[1], img.shape[0]]]
    points, scores = [], []
    for box in found:
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


def whole_body(directory, img, sessions=None):
    detector, pose = sessions or (directory / DETECTOR, directory / WHOLE_BODY)
    found = boxes(detector, img, [0])
    if found is None:
        return None
    points, scores = keypoints(pose, img, found, 288, 384)
    info = np.concatenate([points, scores[..., None]], -1)
    neck = info[:, [5, 6]].mean(1)
    neck[:, 2] = (info[:, 5, 2] > 0.3) & (info[:, 6, 2] > 0.3)
    info = np.insert(info, 17, neck, 1)
    info[:, [1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17]] = \
        info[:, [17, 6, 8, 10, 7, 9, 12, 14, 16, 13, 15, 2, 1, 4, 3]]
    return info


LIMBS = [(1, 2), (2, 3), (1, 3), (3, 4), (4, 9), (9, 10), (10, 11), (4, 6), (6, 7), (7, 8), (4, 5), (5, 15),
         (15, 16), (16, 17), (5, 12), (12, 13), (13, 14)]
COLOURS = [(255, 255, 255), (100, 255, 100), (150, 255, 255), (100, 50, 255), (50, 150, 200), (0, 255, 255),
           (0, 150, 0), (0, 0, 255), (0, 0, 150), (255, 50, 255), (255, 0, 255), (255, 0, 0), (150, 0, 0),
           (255, 255, 100), (0, 150, 0), (255, 255, 0), (150, 150, 150)]


def draw_animals(points, height, width):
    canvas = np.zeros((height, width, 3), np.uint8)
    for animal in points:
        for (a, b), colour in zip(LIMBS, COLOURS):
            cv2.line(canvas, tuple(int(v) for v in animal[a - 1]), tuple(int(v) for v in animal[b - 1]), colour, 5)
    return canvas
