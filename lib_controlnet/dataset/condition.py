"""Condition stage: the conditioning image of each sample, from any registered preprocessor
(lib_controlnet.preprocess.run_batch), resized to the image's own size and stored as lossless PNG."""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np


def encode_png(array: np.ndarray) -> bytes:
    import cv2

    ok, buffer = cv2.imencode(".png", cv2.cvtColor(array, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("PNG encoding failed")
    return buffer.tobytes()


def decode_array(data: bytes) -> np.ndarray:
    from lib_controlnet.images import to_rgb_array

    return to_rgb_array(data)


def fit_to(map_: np.ndarray, height: int, width: int) -> np.ndarray:
    import cv2

    if map_.ndim == 2:
        map_ = np.stack([map_] * 3, -1)
    map_ = map_[..., :3]
    if map_.shape[:2] != (height, width):
        # nearest keeps edge and segmentation maps crisp (no grey fringes a model would learn)
        map_ = cv2.resize(map_, (width, height), interpolation=cv2.INTER_NEAREST)
    return np.ascontiguousarray(map_.astype(np.uint8))


def map_resolution(config) -> int:
    """The resolution the preprocessor runs at: the one asked for, or the image size brought into the registry's
    range (a 32 px dataset still gets maps: made at the smallest resolution, then fitted to the image)."""
    from lib_controlnet.preprocess import MAX_RESOLUTION, MIN_RESOLUTION

    if config.module_resolution:
        return config.module_resolution  # the user's own value: out of range is their error to see
    return min(max(int(config.image_size), MIN_RESOLUTION), MAX_RESOLUTION)


def condition_rows(rows: list[dict], config, batch_size: int = 8,
                   on_batch: Optional[Callable[[int], None]] = None) -> tuple[list[dict], list[dict]]:
    """rows: {key, url, image bytes} -> ([{key, conditioning_image PNG bytes}], failures)."""
    from annotators.weights import AnnotatorWeightsError
    from lib_controlnet import preprocess

    resolution = map_resolution(config)
    done, failures = [], []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        arrays, kept = [], []
        for row in batch:
            try:
                arrays.append(decode_array(row["image"]))
                kept.append(row)
            except Exception as error:  # an undecodable image is one failure, not the end of the build
                failures.append({"key": row["key"], "url": row["url"], "stage": "condition", "reason": f"cannot decode: {error}"})
        try:
            maps = preprocess.run_batch(config.module, arrays, resolution=resolution, threshold_a=config.threshold_a,
                                        threshold_b=config.threshold_b, batch_size=batch_size)
            pairs = list(zip(kept, arrays, maps))
        except (preprocess.PreprocessorError, AnnotatorWeightsError):
            raise  # wrong module, parameters or a missing weight file: every sample would fail the same way
        except Exception:  # find the one bad image instead of dropping the batch
            pairs = []
            for row, array in zip(kept, arrays):
                try:
                    pairs.append((row, array, preprocess.run(config.module, array, resolution=resolution,
                                                             threshold_a=config.threshold_a,
                                                             threshold_b=config.threshold_b, use_cache=False)))
                except Exception as error:
                    failures.append({"key": row["key"], "url": row["url"], "stage": "condition", "reason": str(error)})
        for row, array, map_ in pairs:
            done.append({"key": row["key"], "conditioning_image": encode_png(fit_to(map_, *array.shape[:2]))})
        if on_batch:
            on_batch(len(batch))
    return done, failures
