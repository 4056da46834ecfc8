"""Preprocessor throughput and peak memory: ours against controlnet-aux, same photos, same random weights, 512 px.

Each map runs on each side in a process of its own (so its peak memory is its own), twice in alternation unless
--quick; the best time per map counts, which damps the noise of a shared machine. Prints seconds per map, the
ratio (controlnet-aux time / ours: above 1 means we are faster) and each side's peak RSS for the map.
Targets: >= 1.0x model-free, >= 1.3x neural, peak memory no higher than controlnet-aux's.
Where the default annotator precision is bfloat16 ("auto" on CPUs with AMX), neural maps also run in float32,
whose maps equal controlnet-aux's.

    python benchmarks/bench_preprocess.py            # full: 4 photos, 2 rounds, 6 networks
    python benchmarks/bench_preprocess.py --quick    # 2 photos, 1 round, 3 networks (well under 3 minutes)
    python benchmarks/bench_preprocess.py --heavy --images 2 --reps 1 --rounds 1   # + the large networks
    python benchmarks/bench_preprocess.py --only depth_zoe,mlsd                     # just these maps
    python benchmarks/bench_preprocess.py --paired --only lineart_anime,mlsd        # both sides in one process
    python benchmarks/bench_preprocess.py --only mediapipe_face --images 1 --rounds 1   # needs mediapipe 0.10.9

Depth Anything (controlnet-aux has none) runs against the authors' code, which the other WebUI ControlNet
extension runs, given a checkout of github.com/DepthAnything/Depth-Anything-V2 (benchmarks/_depth_anything_peer.py):

    python benchmarks/bench_preprocess.py --depth-anything /path/to/Depth-Anything-V2 --da-size vits --quick

--paired times both sides in one process per map, image by image in alternation, so a slow spell of a shared
machine falls on both sides alike; it reports time ratios only (one process holds both networks, so its peak
memory belongs to neither).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL_FREE = {"canny": ("canny", "CannyDetector", {}),
              "lineart_standard": ("lineart_standard", "LineartStandardDetector", {}),
              "shuffle": ("shuffle", "ContentShuffleDetector", {})}
NEURAL = {"softedge_hed": ("hed", "HEDdetector", {}),
          "softedge_pidinet": ("pidi", "PidiNetDetector", {}),
          "lineart_realistic": ("lineart", "LineartDetector", {}),
          "softedge_teed": ("teed", "TEEDdetector", {"filename": "7_model.pth"}),
          "lineart_anime": ("lineart_anime", "LineartAnimeDetector", {}),
          "mlsd": ("mlsd", "MLSDdetector", {}),
          "t2ia_sketch_pidi": ("pidi", "PidiNetDetector", {})}
# what controlnet-aux's call needs to give the same map as ours, where its defaults differ
AUX_CALL = {"t2ia_sketch_pidi": {"apply_filter": True}}
QUICK_NEURAL = ["softedge_hed", "softedge_pidinet", "lineart_realistic"]
# --heavy: the large networks (minutes per round; Zoe alone takes about 18 s a map on two cores)
HEAVY = {"depth_midas": ("midas", "MidasDetector", {}),
         "normal_bae": ("normalbae", "NormalBaeDetector", {}),
         "depth_leres": ("leres", "LeresDetector", {}),
         "openpose": ("open_pose", "OpenposeDetector", {}),
         "depth_zoe": ("zoe", "ZoeDetector", {})}
HEAVY_FILES = ["dpt_hybrid-midas-501f0c75.pt", "scannet.pt", "res101.pth", "latest_net_G.pth",
               "body_pose_model.pth", "hand_pose_model.pth", "facenet.pth", "ZoeD_M12_N.pt"]
NEURAL_ALL = {**NEURAL, **HEAVY}
# only with --only (an optional package): mediapipe's face mesh needs no weight file on either side
OPTIONAL = {"mediapipe_face": ("mediapipe_face", "MediapipeFaceDetector", {})}
SIDES = ("ours", "aux", "ours-float32", "ours-batch")
DA_SIDES = ("da-ours", "da-reference", "da-ours-float32")
PAIRED = "paired"


def _photos(count: int, size: int):
    import cv2
    import skimage.data

    sources = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    out = []
    for image in sources[:count]:
        h, w = image.shape[:2]
        scale = size / min(h, w)
        # sides that are multiples of 64, so controlnet-aux's own rounding resize is a no-op for both sides
        new_w, new_h = int(round(w * scale / 64)) * 64, int(round(h * scale / 64)) * 64
        out.append(cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA))
    return out


def _time(fn, images, reps: int) -> float:
    fn(images[0])  # warm-up: first-call allocations and lazy loading are not throughput
    best = float("inf")
    for _ in range(reps):
        started = time.perf_counter()
        for image in images:
            fn(image)
        best = min(best, (time.perf_counter() - started) / len(images))
    return best


def _time_batch(run_all, count: int, reps: int) -> float:
    run_all()  # warm-up: each image size once, as _time warms up
    best = float("inf")
    for _ in range(reps):
        started = time.perf_counter()
        run_all()
        best = min(best, (time.perf_counter() - started) / count)
    return best


def _reset_peak() -> None:
    """Start this process's peak-RSS count again (Linux: clear_refs 5), so each map's peak is its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_mb() -> float:
    """Peak RSS since the last _reset_peak (VmHWM). Not ru_maxrss: that keeps the peak of the parent that
    forked this process, and the parent built every network to write its weights."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _ours_call(name: str, args):
    from lib_controlnet import preprocess

    return lambda im: preprocess.run(name, im, resolution=args.size, use_cache=False)


def _aux_call(name: str, args, device=None):
    """controlnet-aux's detector for `name`, moved to `device` when given (its users call .to themselves)."""
    import controlnet_aux  # the peer as its users import it

    _, cls, kw = {**MODEL_FREE, **NEURAL_ALL, **OPTIONAL}[name]
    detector_class = getattr(controlnet_aux, cls)
    detector = detector_class.from_pretrained(args.weights, **kw) if name in NEURAL_ALL else detector_class()
    if device is not None and hasattr(detector, "to"):
        detector.to(device)
    if name == "depth_leres":
        detector.model.eval()  # controlnet-aux leaves it in training mode: compare the same computation
    if name in ("lineart_standard", "softedge_teed"):  # no image_resolution argument
        return lambda im: detector(im, detect_resolution=args.size, output_type="np")
    extra = AUX_CALL.get(name, {})
    return lambda im: detector(im, detect_resolution=args.size, image_resolution=args.size, output_type="np",
                               **extra)


def _time_paired(ours, aux, images, reps: int) -> tuple[float, float]:
    """Best seconds per image for each side, timed image by image in alternation (the side that goes first
    swaps every rep)."""
    ours(images[0])
    aux(images[0])
    best = {"ours": float("inf"), "aux": float("inf")}
    for rep in range(reps):
        spent = {"ours": 0.0, "aux": 0.0}
        order = [("ours", ours), ("aux", aux)]
        for image in images:
            for side, fn in order if rep % 2 == 0 else order[::-1]:
                started = time.perf_counter()
                fn(image)
                spent[side] += time.perf_counter() - started
        best = {side: min(best[side], spent[side] / len(images)) for side in best}
    return best["ours"], best["aux"]


def child(args) -> None:
    import lib_controlnet  # noqa: F401  (torchvision repair first, on both sides)
    from lib_controlnet.settings import update_settings

    update_settings(annotator_models_path=Path(args.weights),
                    annotator_precision="float32" if args.side.endswith("ours-float32") else "auto")
    images = _photos(args.images, args.size)
    if args.side in DA_SIDES:
        import _depth_anything_peer

        print("RESULT " + json.dumps(_depth_anything_peer.child(args, images, _time, _reset_peak, _peak_mb)))
        return
    names = args.names.split(",")
    result = {}
    if args.side == PAIRED:
        for name in names:
            result[name], result[name + " (aux)"] = _time_paired(_ours_call(name, args), _aux_call(name, args),
                                                                 images, args.reps)
    elif args.side.startswith("ours"):
        from annotators import runtime
        from lib_controlnet import preprocess

        result["precision"] = "bfloat16" if runtime.low_precision_dtype() is not None else "float32"
        for name in names:
            if args.side == "ours-float32" and name not in NEURAL_ALL:
                continue
            _reset_peak()
            if args.side in ("ours", "ours-float32"):
                result[name] = _time(_ours_call(name, args), images, args.reps)
            elif name in NEURAL_ALL:
                result[name + " (batch)"] = _time_batch(
                    lambda n=name: preprocess.run_batch(n, images, resolution=args.size, batch_size=len(images)),
                    len(images), args.reps)
            result[name + " peak_mb"] = _peak_mb()
    else:
        for name in names:
            _reset_peak()
            result[name] = _time(_aux_call(name, args), images, args.reps)
            result[name + " peak_mb"] = _peak_mb()
    print("RESULT " + json.dumps(result))


def _run_side(side: str, weights: Path, names, args) -> dict:
    command = [sys.executable, "-W", "ignore", __file__, "--child", side, "--weights", str(weights),
               "--names", ",".join(names), "--images", str(args.images), "--reps", str(args.reps),
               "--size", str(args.size)]
    if args.depth_anything:
        command += ["--depth-anything", args.depth_anything, "--da-size", args.da_size]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{side} side failed:\n{done.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def _print_paired(times: dict, names, rounds: int, args) -> None:
    print(f"\npreprocessors at {args.size} px, {args.images} photos, both sides in one process, alternating image "
          f"by image, best of {rounds} round(s) x {args.reps} rep(s)")
    print(f"{'map':<22}{'ours s/map':>12}{'aux s/map':>12}{'ratio':>8}   target")
    for name in names:
        ours, aux = times[name], times[name + " (aux)"]
        target = 1.0 if name in MODEL_FREE or name in OPTIONAL else 1.3
        print(f"{name:<22}{ours:>12.4f}{aux:>12.4f}{aux / ours:>7.2f}x   >= {target}x")


def _main_depth_anything(args, rounds: int) -> None:
    import lib_controlnet  # noqa: F401
    import _depth_anything_peer as peer
    from annotators.runtime import low_precision_dtype

    sides = ["da-ours", "da-reference"] + (["da-ours-float32"] if low_precision_dtype() is not None else [])
    best: dict[str, dict] = {side: {} for side in sides}
    with tempfile.TemporaryDirectory() as tmp:
        peer.write_weights(Path(tmp), args.da_size)
        for _ in range(rounds):
            for name in peer.NAMES:
                for side in sides:  # one process per map and side: each peak is its own
                    for key, value in _run_side(side, Path(tmp), [name], args).items():
                        best[side][key] = min(best[side].get(key, value), value)
    print(f"\nDepth Anything ({args.da_size}, random weights) at {args.size} px, {args.images} photos, best of "
          f"{rounds} round(s) x {args.reps} rep(s); peer: the authors' code (Depth-Anything-V2), default precision "
          f"here: {'bfloat16' if 'da-ours-float32' in sides else 'float32'}")
    print(f"{'map':<22}{'ours s/map':>12}{'peer s/map':>12}{'ratio':>8}   peak MB ours / peer (ratio)")
    for name in peer.NAMES:
        for label, side in (("", "da-ours"), ("  float32", "da-ours-float32")):
            if side not in best:
                continue
            ours, theirs = best[side][name], best["da-reference"][name]
            peaks = best[side][name + " peak_mb"], best["da-reference"][name + " peak_mb"]
            print(f"{(label or name):<22}{ours:>12.4f}{theirs:>12.4f}{theirs / ours:>7.2f}x   "
                  f"{peaks[0]:6.0f} / {peaks[1]:.0f} ({peaks[0] / peaks[1]:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--heavy", action="store_true", help="also MiDaS, NormalBAE, LeReS, OpenPose and Zoe")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--only", help="comma-separated maps to time (any of the above), e.g. depth_zoe")
    parser.add_argument("--paired", action="store_true",
                        help="both sides in one process per map, image by image in alternation (time ratios only)")
    parser.add_argument("--depth-anything", metavar="REPO",
                        help="time depth_anything and depth_anything_v2 against the authors' code in this "
                             "Depth-Anything-V2 checkout (only these maps)")
    parser.add_argument("--da-size", choices=("vits", "vitb", "vitl"), default="vits",
                        help="Depth Anything encoder for --depth-anything (vitl: 1.3 GB of weights, ~10 s a map "
                             "on two cores)")
    parser.add_argument("--child", choices=SIDES + (PAIRED,) + DA_SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--names", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.images = args.images or (2 if args.quick else 4)
    args.reps = args.reps or (1 if args.quick else 2)
    if args.child:
        args.side = args.child
        child(args)
        return
    rounds = args.rounds or (1 if args.quick else 2)
    if args.depth_anything:
        return _main_depth_anything(args, rounds)
    neural = (QUICK_NEURAL if args.quick else list(NEURAL)) + (list(HEAVY) if args.heavy else [])
    names = list(MODEL_FREE) + neural
    if args.only:
        unknown = set(args.only.split(",")) - set(MODEL_FREE) - set(NEURAL_ALL) - set(OPTIONAL)
        if unknown:
            parser.error(f"unknown map(s): {', '.join(sorted(unknown))}")
        names = args.only.split(",")
        neural = [name for name in names if name in NEURAL_ALL]

    import lib_controlnet  # noqa: F401
    from annotators import random_weights

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp)
        files = ["ControlNetHED.pth", "table5_pidinet.pth", "sk_model.pth", "sk_model2.pth", "7_model.pth",
                 "netG.pth", "mlsd_large_512_fp32.pth"]
        random_weights.write(weights, files + (HEAVY_FILES if set(names) & set(HEAVY) else []))
        best: dict[str, dict] = {side: {} for side in SIDES + (PAIRED,)}
        from annotators.runtime import low_precision_dtype

        # where the default precision is float32 already, the float32 side would only time the same maps again
        sides = SIDES if low_precision_dtype() is not None else [s for s in SIDES if s != "ours-float32"]
        if args.paired:
            sides = [PAIRED]
        for _ in range(rounds):
            # one process per map and side: each map's peak memory is its own, not what earlier maps left behind
            for name in names:
                for side in sides:
                    if side in ("ours-float32", "ours-batch") and name not in NEURAL_ALL:
                        continue
                    for key, value in _run_side(side, weights, [name], args).items():
                        previous = best[side].get(key)
                        best[side][key] = value if previous is None or isinstance(value, str) \
                            else min(previous, value)

    if args.paired:
        _print_paired(best[PAIRED], names, rounds, args)
        return
    print(f"\npreprocessors at {args.size} px, {args.images} photos, best of {rounds} round(s) x {args.reps} rep(s), "
          f"torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}, default precision here: "
          f"{best['ours']['precision']}")
    print(f"{'map':<22}{'ours s/map':>12}{'aux s/map':>12}{'ratio':>8}   target   peak MB ours / aux")
    groups = {"model-free": [name for name in names if name in MODEL_FREE or name in OPTIONAL], "neural": neural}
    for group, members in groups.items():
        if not members:
            continue
        ratios = []
        for name in members:
            ours, aux = best["ours"][name], best["aux"][name]
            ratios.append(aux / ours)
            target = 1.0 if group == "model-free" else 1.3
            peaks = best["ours"][name + " peak_mb"], best["aux"][name + " peak_mb"]
            print(f"{name:<22}{ours:>12.4f}{aux:>12.4f}{aux / ours:>7.2f}x   >= {target}x"
                  f"   {peaks[0]:6.0f} / {peaks[1]:.0f}")
            if name in best["ours-float32"] and best["ours"]["precision"] != "float32":
                exact = best["ours-float32"][name]
                print(f"{'  float32':<22}{exact:>12.4f}{aux:>12.4f}{aux / exact:>7.2f}x")
            if name + " (batch)" in best["ours-batch"]:
                batch = best["ours-batch"][name + " (batch)"]
                print(f"{'  run_batch':<22}{batch:>12.4f}{aux:>12.4f}{aux / batch:>7.2f}x")
        geo = 1.0
        for r in ratios:
            geo *= r
        print(f"{group} geometric mean ratio: {geo ** (1 / len(ratios)):.2f}x")
    ours_mb, aux_mb = (max(best[side][name + " peak_mb"] for name in names) for side in ("ours", "aux"))
    print(f"peak memory (RSS, MB, one image at a time, the largest map): ours {ours_mb:.0f}, controlnet-aux "
          f"{aux_mb:.0f}, ratio {ours_mb / aux_mb:.2f}   <= 1.0")
    if neural:
        batch_mb = max(best["ours-batch"][name + " peak_mb"] for name in neural)
        print(f"(batched run_batch of {args.images} images, not compared: peak {batch_mb:.0f} MB)")


if __name__ == "__main__":
    main()
