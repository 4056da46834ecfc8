"""dw_openpose_full and animal_openpose through onnxruntime: ours against the published DWPose ONNX pipeline
(tests/dwpose_reference.py: per-box crops, float64 normalisation, one pose-model run per box, NMS over all 80
classes), with the same ONNX files and the same onnxruntime sessions' settings, at 512 px.

controlnet-aux 0.0.10 has a dwpose module, but it runs the .pth releases through mmpose/mmdet/mmcv, which do not
install beside the WebUI's pins, so it cannot be timed here; the published ONNX pipeline is the peer. The ONNX
files are annotators.random_onnx's graphs with the real input and output names and shapes, made heavier with
--width/--depth (the real YOLOX-L and DW-LL are far larger: there the networks dominate both sides alike, and the
ratio moves towards 1). Both sides run in one process, image by image in alternation; the best of --reps
rounds counts. Every image's keypoints are checked equal between the sides. Peak memory: the largest Python-side
allocation peak (tracemalloc, which sees numpy's buffers; onnxruntime's own arena is the same for both) of one call.

    python benchmarks/bench_pose.py            # 4 photos + 1 scene with people, 3 rounds
    python benchmarks/bench_pose.py --quick    # 2 images, 2 rounds, light networks
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))  # tests/ itself: dwpose_reference (not an installed `tests` package)


def _images(count: int, size: int):
    import cv2
    import numpy as np
    import skimage.data

    scene = np.zeros((size, size * 5 // 4, 3), np.uint8)  # red people and a green dog for the small detector
    scene[size // 8:size * 3 // 4, size // 4:size * 2 // 5, 0] = 230
    scene[size // 6:size * 2 // 3, size * 3 // 4:size * 7 // 8, 0] = 220
    scene[size * 4 // 5:size * 19 // 20, size * 3 // 5:size, 1] = 230
    out = [scene]
    for image in [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(),
                  skimage.data.rocket()][:max(0, count - 1)]:
        h, w = image.shape[:2]
        k = size / min(h, w)
        out.append(cv2.resize(image, (round(w * k), round(h * k)), interpolation=cv2.INTER_AREA))
    return out


def _peak(fn, image) -> float:
    tracemalloc.start()
    tracemalloc.reset_peak()
    fn(image)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2 ** 20


def _paired(ours, theirs, images, reps: int) -> tuple[float, float]:
    for image in images[:1]:
        ours(image), theirs(image)  # warm-up: sessions' first runs and lazy imports are not throughput
    best_ours = best_theirs = float("inf")
    for _ in range(reps):
        t_ours = t_theirs = 0.0
        for image in images:
            started = time.perf_counter()
            ours(image)
            t_ours += time.perf_counter() - started
            started = time.perf_counter()
            theirs(image)
            t_theirs += time.perf_counter() - started
        best_ours, best_theirs = min(best_ours, t_ours / len(images)), min(best_theirs, t_theirs / len(images))
    return best_ours, best_theirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--width", type=int, default=None, help="channels of the stand-in networks (default 24)")
    parser.add_argument("--depth", type=int, default=None, help="extra 3x3 convolutions in them (default 2)")
    args = parser.parse_args()
    count = args.images or (2 if args.quick else 5)
    reps = args.reps or (2 if args.quick else 3)
    width = args.width or (8 if args.quick else 24)
    depth = args.depth if args.depth is not None else (0 if args.quick else 2)

    import numpy as np

    import dwpose_reference as reference
    from annotators import dwpose, onnx_pose, random_onnx
    from lib_controlnet.settings import update_settings

    folder = Path(tempfile.mkdtemp(prefix="bench-pose-"))
    random_onnx.write(folder, width=width, depth=depth)
    update_settings(annotator_models_path=folder, allow_annotator_downloads=False)
    images = _images(count, args.size)
    # the reference keeps its sessions too, as the other extension does between calls
    detector = reference._session(folder / reference.DETECTOR)
    whole_body = reference._session(folder / reference.WHOLE_BODY)
    animal = reference._session(folder / reference.ANIMAL)

    def ref_people(img):
        return reference.whole_body(folder, img, sessions=(detector, whole_body))

    def ref_animals(img):
        found = reference.boxes(detector, img, list(range(14, 24)))
        if found is None:
            return np.zeros((0, 17, 2)), np.zeros((0, 17))
        return reference.keypoints(animal, img, found, 256, 256)

    people_seen = []
    for img in images:
        ours, theirs = dwpose.whole_body(img), ref_people(img)
        assert (ours is None) == (theirs is None), "the sides disagree on whether anyone is there"
        if ours is not None:
            np.testing.assert_allclose(ours, theirs, atol=1e-3)
            people_seen.append(len(ours))
        np.testing.assert_allclose(dwpose.animals(img)[0], ref_animals(img)[0], atol=1e-3)
    boxes = [len(b) for b in (onnx_pose.detect_boxes(onnx_pose.session(folder / reference.DETECTOR), img, [0])
                              for img in images) if b is not None]
    print(f"{len(images)} images at {args.size} px, stand-in networks width {width} depth {depth}; "
          f"person boxes per image: {boxes}; keypoints equal on both sides")
    print(f"{'map':<18} {'ours s/img':>10} {'reference':>10} {'ratio':>7} {'ours MB':>8} {'ref MB':>8}")
    for name, ours, theirs in (("dw_openpose_full", dwpose.whole_body, ref_people),
                               ("animal_openpose", dwpose.animals, ref_animals)):
        t_ours, t_theirs = _paired(ours, theirs, images, reps)
        m_ours = max(_peak(ours, img) for img in images)
        m_theirs = max(_peak(theirs, img) for img in images)
        print(f"{name:<18} {t_ours:>10.4f} {t_theirs:>10.4f} {t_theirs / t_ours:>6.2f}x "
              f"{m_ours:>8.1f} {m_theirs:>8.1f}")
    print("ratio: reference time / ours (above 1: ours faster); MB: peak Python-side allocation of one call")


if __name__ == "__main__":
    main()
