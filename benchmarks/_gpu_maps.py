"""GPU suite, map sections: preprocessors (ours vs controlnet-aux on the same photos and random weights under the
real file names, both on the GPU) and the dataset builder's conditioning stage (images/s) against
controlnet-aux run image by image with the same PNG encoding.

Both sides run in this one process, call by call in alternation (bench_preprocess.py's --paired way), so a
slow moment hits both alike. Peak memory per call is what the call allocated above what was allocated
before it (the weights of both sides stay resident).
"""
from __future__ import annotations

import types

from benchmarks import bench_preprocess
from benchmarks._suite import Row, median, ratio

# what users call them -> our registry name (bench_preprocess knows each one's controlnet-aux class)
MAPS = {"canny": "canny", "HED": "softedge_hed", "depth (MiDaS)": "depth_midas", "OpenPose": "openpose",
        "line art": "lineart_realistic"}
FILES = {"softedge_hed": ["ControlNetHED.pth"], "lineart_realistic": ["sk_model.pth", "sk_model2.pth"],
         "depth_midas": ["dpt_hybrid-midas-501f0c75.pt"],
         "openpose": ["body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"]}
# --tiny keeps the networks that build and run in about a second on two CPU cores; MiDaS (123M parameters) and
# OpenPose take far longer there at any image size (their CPU figures are bench_preprocess.py --heavy's)
TINY_MAPS = ("canny", "softedge_hed", "lineart_realistic")
CONDITION_MODULE = "softedge_hed"


def _weights(ctx, names) -> types.SimpleNamespace:
    from annotators import random_weights
    from lib_controlnet.settings import update_settings

    folder = ctx.work / "annotators"
    random_weights.write(folder, [f for name in names for f in FILES.get(name, [])])
    update_settings(annotator_models_path=folder)
    return types.SimpleNamespace(weights=str(folder), size=ctx.map_size)


def _measured_call(dev, fn, image, times: list, peaks: list) -> None:
    dev.reset_peak()
    before = dev.allocated_gb()
    times.append(dev.timed(lambda: fn(image)))
    if before is not None:
        peaks.append(dev.peak_gb() - before)


def preprocess_section(ctx, deadline) -> list[Row]:
    section = "preprocessors"
    names = [n for n in MAPS.values() if not ctx.tiny or n in TINY_MAPS]
    args = _weights(ctx, names)
    images = bench_preprocess._photos(2 if ctx.tiny else 4, ctx.map_size)
    rounds = 1 if ctx.tiny else 5
    rows = []
    for index, (label, name) in enumerate(MAPS.items()):
        item = f"{label} ({name}), {ctx.map_size} px"
        if name not in names:
            rows.append(Row(section, item, status="not available: not run in --tiny (full-size networks only; "
                                                  "their CPU figures come from bench_preprocess.py --heavy)"))
            continue
        if deadline.expired():
            rows.append(Row(section, item, status=f"not measured: the section's {deadline.limit:.0f} s ran out"))
            continue
        share = deadline.share(len(names) - names.index(name))
        try:
            times, peaks = _paired(ctx, name, args, images, rounds, share)
        except Exception as error:  # one broken map (either side) is its row; the other maps still run
            import traceback

            traceback.print_exc()
            rows.append(Row(section, item, status=f"failed: {type(error).__name__}: {error}"[:300]))
            continue
        finally:
            ctx.dev.free()
        from annotators.runtime import low_precision_dtype

        precision = "bfloat16" if low_precision_dtype() is not None else "float32"
        rows.append(Row(section, item, "s/map", median(times["ours"]), median(times["aux"]), "controlnet-aux",
                        ratio(median(times["ours"]), median(times["aux"])), "lower",
                        max(peaks["ours"], default=None), max(peaks["aux"], default=None), len(times["ours"]),
                        note=f"ours in our default precision here ({precision}); peak = added during a call"))
    return rows


def _paired(ctx, name: str, args, images, rounds: int, deadline):
    """Seconds per map and added peak memory per call, both sides, call by call in alternation."""
    ours = bench_preprocess._ours_call(name, args)
    aux = bench_preprocess._aux_call(name, args, device=ctx.device)
    ours(images[0])  # warm-up: lazy loading and first-call allocations are not throughput
    aux(images[0])
    times = {"ours": [], "aux": []}
    peaks = {"ours": [], "aux": []}
    for rep in range(rounds):
        for image in images:
            if deadline.expired() and times["ours"]:
                return times, peaks
            order = [("ours", ours), ("aux", aux)] if rep % 2 == 0 else [("aux", aux), ("ours", ours)]
            for side, fn in order:
                _measured_call(ctx.dev, fn, image, times[side], peaks[side])
    return times, peaks


def dataset_section(ctx, deadline) -> list[Row]:
    import cv2

    from lib_controlnet.dataset.condition import condition_rows, decode_array, encode_png, fit_to
    from lib_controlnet.dataset.config import BuildConfig

    section = "dataset builder"
    args = _weights(ctx, [CONDITION_MODULE])
    count = 4 if ctx.tiny else 48
    photos = bench_preprocess._photos(4, ctx.map_size)
    rows_in = []
    for i in range(count):
        ok, buffer = cv2.imencode(".jpg", cv2.cvtColor(photos[i % len(photos)], cv2.COLOR_RGB2BGR))
        rows_in.append({"key": f"{i:06d}", "url": f"file://bench/{i}.jpg", "image": buffer.tobytes()})
    config = BuildConfig(out_dir=str(ctx.work / "dataset"), image_size=ctx.map_size, module=CONDITION_MODULE)
    aux = bench_preprocess._aux_call(CONDITION_MODULE, args, device=ctx.device)

    def ours(rows):
        done, failures = condition_rows(rows, config, batch_size=8)
        if failures or len(done) != len(rows):
            raise RuntimeError(f"the conditioning stage failed on {len(failures)} of {len(rows)} images")

    def peer(rows):  # the same work, image by image: decode, detect, fit to the image, PNG
        for row in rows:
            array = decode_array(row["image"])
            encode_png(fit_to(aux(array), *array.shape[:2]))

    ours(rows_in[:2])  # warm-up
    peer(rows_in[:2])
    rates = {"ours": [], "peer": []}
    for rep in range(1 if ctx.tiny else 3):
        if deadline.expired() and rates["ours"]:
            break
        for side, fn in ((("ours", ours), ("peer", peer)) if rep % 2 == 0 else (("peer", peer), ("ours", ours))):
            rates[side].append(count / ctx.dev.timed(lambda: fn(rows_in)))
    item = f"conditioning stage ({CONDITION_MODULE}), {count} JPEGs at {ctx.map_size} px"
    return [Row(section, item, "images/s", median(rates["ours"]), median(rates["peer"]),
                "controlnet-aux image by image", ratio(median(rates["ours"]), median(rates["peer"])), "higher",
                samples=len(rates["ours"]), note="decode + detect + fit + PNG, batches of 8 on our side")]

