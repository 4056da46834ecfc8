"""Running annotator networks: each network is loaded once and kept, on the best device, in inference mode.

controlnet-aux's package __init__ imports every detector (and so torchvision, timm, mediapipe...); `aux_module`
imports only the detector module asked for, keeping `import controlnet_aux` itself working for anyone else.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import sys
import threading
import types
from typing import Callable, Sequence

import numpy as np

from lib_controlnet.settings import get_settings

_loaded: dict = {}
_lock = threading.RLock()


def aux_module(name: str) -> types.ModuleType:
    """`controlnet_aux.<name>` without running controlnet_aux/__init__.py (unless someone already did)."""
    if "controlnet_aux" not in sys.modules:
        spec = importlib.util.find_spec("controlnet_aux")
        if spec is None:
            raise ImportError("controlnet-aux is not installed (pip install controlnet-aux==0.0.10)")
        package = importlib.util.module_from_spec(spec)

        def _full(attr, _package=package, _spec=spec):
            # someone wants a name from the real __init__ (e.g. `from controlnet_aux import HEDdetector`)
            del _package.__getattr__
            _spec.loader.exec_module(_package)
            return getattr(_package, attr)

        package.__getattr__ = _full
        sys.modules["controlnet_aux"] = package
    return importlib.import_module(f"controlnet_aux.{name}")


def device():
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@functools.lru_cache(maxsize=1)
def bfloat16_matrix_units() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in AMX tiles: there bfloat16 convolutions run several
    times faster than float32 ones, no need to measure."""
    import torch

    try:
        return bool(torch.cpu._is_amx_tile_supported() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # private probes: an older or newer torch may lack them
        return False


@functools.lru_cache(maxsize=1)
def bfloat16_instructions() -> bool:
    """Whether oneDNN runs bfloat16 here with the CPU's own bfloat16 dot products (avx512_bf16, or AMX)."""
    import torch

    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        try:  # an older torch without the probe: the kernel's CPU flags
            with open("/proc/cpuinfo") as info:
                return " avx512_bf16" in info.read()
        except OSError:
            return False


PROBE_VERSION = 2  # part of the cache key: a changed probe measures again
# bfloat16 must be at least this much faster in the probe to be picked: below it the maps' rounding buys too little
MEASURED_GAIN = 1.15


def _time_precisions(seconds: float = 0.3, most: int = 100) -> float:
    """float32 time / bfloat16 time on a probe shaped like the annotators' work: a 3x3 convolution over a
    64-channel map (channels-last) and a token-by-feature matrix product, float32 and bfloat16 in alternation.

    Timed on one thread in that thread's CPU time (time.thread_time), each one's best run counting: the ratio is
    the core's own, whatever else the machine runs. Wall-clock timing on a shared, busy CPU gave ratios from 0.5
    to 16 for the same probe; CPU time does not count the moments the thread waits for a core."""
    import time

    import torch

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).eval().to(memory_format=torch.channels_last)
    linear = torch.nn.Linear(384, 1536).eval()
    probes = ((conv, torch.randn(1, 64, 32, 32).contiguous(memory_format=torch.channels_last)),
              (linear, torch.randn(1, 197, 384)))

    def once(layer, x, low: bool) -> float:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
            started = time.thread_time()
            layer(x)
            return time.thread_time() - started

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for layer, x in probes:  # first-call set-up (oneDNN primitives) is not speed
            once(layer, x, False), once(layer, x, True)
        best = [[float("inf")] * 2 for _ in probes]
        deadline = time.perf_counter() + seconds
        for run in range(most):
            for index, (layer, x) in enumerate(probes):
                best[index][0] = min(best[index][0], once(layer, x, False))
                best[index][1] = min(best[index][1], once(layer, x, True))
            if run >= 5 and time.perf_counter() > deadline:
                break
    finally:
        torch.set_num_threads(threads)
    return sum(b[0] for b in best) / max(sum(b[1] for b in best), 1e-9)


@dataclasses.dataclass(frozen=True)
class PrecisionChoice:
    dtype: object  # torch.bfloat16 or None (float32)
    reason: str


def choose_auto_precision(amx: bool, bf16: bool, measure: Callable[[], float]) -> PrecisionChoice:
    """What "auto" means on a CPU: bfloat16 with AMX (known several times faster); measured where the CPU has
    bfloat16 instructions without AMX (avx512_bf16: faster on most such CPUs, not on all); float32 where oneDNN
    would emulate bfloat16 (slower)."""
    import torch

    if amx:
        return PrecisionChoice(torch.bfloat16, "AMX bfloat16 matrix units")
    if not bf16:
        return PrecisionChoice(None, "no bfloat16 instructions on this CPU")
    gain = measure()
    if gain >= MEASURED_GAIN:
        return PrecisionChoice(torch.bfloat16, f"avx512_bf16: bfloat16 measured {gain:.1f}x faster than float32")
    return PrecisionChoice(None, f"avx512_bf16, but bfloat16 measured only {gain:.2f}x as fast as float32")


def _measured_gain_cache():
    """The probe's result is kept per machine (CPU, torch) in the user's cache folder: every
    process then makes the same choice, and a map does not change with how busy the CPU was at start-up."""
    import json
    import os
    import platform
    from pathlib import Path

    import torch

    folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "controlnet-studio"
    key = f"probe {PROBE_VERSION}|{platform.machine()}|{_cpu_name()}|torch {torch.__version__}"
    path = folder / "bfloat16_gain.json"

    def measure() -> float:
        try:
            known = json.loads(path.read_text())
        except (OSError, ValueError):
            known = {}
        if isinstance(known.get(key), (int, float)):
            return float(known[key])
        gain = _time_precisions()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            known[key] = gain
            tmp = path.with_name(f"{path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(known, indent=1))
            os.replace(tmp, path)
        except OSError:  # a read-only home: measure again next time
            pass
        return gain

    return measure


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


@functools.lru_cache(maxsize=1)
def auto_precision() -> PrecisionChoice:
    """The "auto" choice on this machine, decided (and logged) once per process."""
    if device().type != "cpu":
        choice = PrecisionChoice(None, f"{device().type} device")
    else:
        choice = choose_auto_precision(bfloat16_matrix_units(), bfloat16_instructions(), _measured_gain_cache())
    name = "float32" if choice.dtype is None else "bfloat16"
    print(f"ControlNet Studio: preprocessor precision auto -> {name} ({choice.reason}).", file=sys.stderr, flush=True)
    return choice


def low_precision_dtype():
    """torch.bfloat16 when the annotator_precision setting allows it for the networks that ask, else None."""
    import torch

    choice = get_settings().annotator_precision
    if choice == "bfloat16":
        return torch.bfloat16
    if choice == "auto":
        return auto_precision().dtype
    return None


@contextlib.contextmanager
def inference(low_precision: bool = False):
    """Inference mode; with low_precision, also bfloat16 autocast where the setting allows it.

    Asked for by HED, PiDiNet, line art, M-LSD, MiDaS depth and NormalBAE (LeReS goes through
    low_precision.LowPrecisionForward). Measured at 512 px on random weights: line art, depth and normals move
    by at most 4 grey levels, anime line art by 14 at most and 1 on average; in thresholded maps the pixels
    right at the threshold flip. Float32 always: MiDaS normals (Sobel derivatives of depth), OpenPose and
    segmentation (peaks and argmaxes), Zoe (its percentile stretch magnifies rounding) and TEED (no faster).
    Callers turn the outputs back to float32 before scaling them to 0..255.
    """
    import torch

    dtype = low_precision_dtype() if low_precision else None
    with torch.inference_mode():
        if dtype is None:
            yield
        else:
            with torch.autocast(device().type, dtype=dtype):
                yield


def load_once(key, loader: Callable):
    """The object `loader()` built for this key the first time; later calls get the same object."""
    with _lock:
        if key not in _loaded:
            _loaded[key] = loader()
        return _loaded[key]


def unload_all() -> None:
    with _lock:
        _loaded.clear()


def prepare(module, channels_last: bool = True):
    """eval, no grads, on the device; batch norms folded into their convolutions, activations in place where
    safe, one-output-channel convolutions and transposed ones over small maps as matrix products, large 3x3
    ones through NNPACK's Winograd kernels (fixed rules on the shapes); NHWC memory where the convolutions run
    faster with it. Every rewrite is deterministic: the same map comes out on every run.

    No per-shape CPU kernel choice here (lib_controlnet.cpu_kernels): it is timed, so float rounding could
    differ between runs, and a map (a dataset's above all) should come out the same every time; the gain on
    these networks was a few percent.
    """
    import torch

    from annotators import one_channel_conv, small_map_conv, winograd_conv  # import torch: only once prepared
    from annotators.batchnorm_folding import fold_batchnorms

    module.eval().requires_grad_(False)
    fold_batchnorms(module)
    activations_in_place(module)
    one_channel_conv.install(module)
    small_map_conv.install(module)
    winograd_conv.install(module)
    module.to(device())
    if channels_last:
        module.to(memory_format=torch.channels_last)
    return module


def activations_in_place(module) -> None:
    """Let each ReLU-family activation whose input is fresh (`layers_with_fresh_input`) overwrite it. An
    out-of-place ReLU allocates a new map (page faults on every call for large ones): for M-LSD's
    128 x 256 x 384 maps that was 40 ms of a 230 ms convolution plus ReLU on two cores."""
    from torch import nn

    activations = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.SiLU, nn.ELU)
    for child in layers_with_fresh_input(module):
        if type(child) in activations:
            child.inplace = True


def layers_with_fresh_input(module):
    """Each layer in a Sequential of `module` whose input is a fresh output of the layer before it (a
    convolution, linear or norm layer, possibly through the Identity a folded batch norm left) and that no hook
    can see, nor the layer itself: nothing else holds that tensor, so the layer may overwrite it."""
    from torch import nn

    fresh = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.BatchNorm2d, nn.InstanceNorm2d, nn.GroupNorm,
             nn.LayerNorm)
    for sequential in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        children = list(sequential.children())
        for index, child in enumerate(children):
            if _hooked(child):  # a hook would see its input changed
                continue
            source = index - 1
            while source >= 0 and type(children[source]) is nn.Identity and not _hooked(children[source]):
                source -= 1
            if source >= 0 and isinstance(children[source], fresh) and not _hooked(children[source]):
                yield child


def _hooked(layer) -> bool:
    return bool(layer._forward_hooks or getattr(layer, "_forward_hooks_with_kwargs", None))


def to_batch(images: Sequence[np.ndarray], scale: float = 1.0, offset: float = 0.0, bgr: bool = False,
             channels_last: bool = True):
    """Same-size HxWx3 uint8 images -> float NCHW tensor (x * scale + offset) on the device, one copy."""
    import torch

    # one image: torch's unsqueeze, not numpy's [None], whose zero batch stride makes PyTorch see NCHW and run
    # whole networks in it (MiDaS's padded stem: 730 -> 580 ms)
    if len(images) > 1:
        tensor = torch.from_numpy(np.stack(images))
    else:
        tensor = torch.from_numpy(np.ascontiguousarray(images[0])).unsqueeze(0)
    tensor = tensor.to(device())
    if bgr:
        tensor = tensor.flip(-1)
    tensor = tensor.permute(0, 3, 1, 2).float()  # a view: NHWC memory is exactly channels_last
    if scale != 1.0 or offset != 0.0:
        tensor = tensor.mul_(scale).add_(offset) if tensor.is_contiguous(memory_format=torch.channels_last) \
            else tensor * scale + offset
    if not channels_last:
        tensor = tensor.contiguous()
    return tensor


def to_uint8(maps) -> list[np.ndarray]:
    """N x H x W float tensor in [0, 255] -> list of HxW uint8 (truncating, as controlnet-aux's astype does)."""
    return list(maps.clamp_(0, 255).to(dtype=__import__("torch").uint8).cpu().numpy())


def batchable(batch_fn: Callable) -> Callable:
    """Make `f(img, params)` from `batch_fn(images, params)`, keeping `batch_fn` as `.batch` for run_batch."""

    def single(img, params):
        return batch_fn([img], params)[0]

    single.batch = batch_fn
    single.__name__ = getattr(batch_fn, "__name__", "annotator").lstrip("_")
    single.__doc__ = batch_fn.__doc__
    return single
