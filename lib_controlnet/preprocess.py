"""The preprocessor registry: names, sliders and control types as WebUI ControlNet users know them, and `run`.

Every preprocessor has an internal name (what `/controlnet/module_list` lists) and a label (what it lists with
`alias_names=true` and what the panel shows): `depth` is shown as `depth_midas`, `hed` as `softedge_hed`, and so on.
Either one, in any letter case, finds it.

`run` owns everything around an annotator: decoding the input, parameter defaults and ranges, resizing the short
side to the preprocessor resolution, padding for networks that need it, an LRU cache of results keyed on the
image bytes and the parameters, and turning the result into HxWx3 uint8.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import importlib
import threading
from typing import Any, Callable, Optional, Sequence

import numpy as np

from annotators.common import Params, pad_to_multiple, resize_short_side, to_hwc3
from lib_controlnet import images
from lib_controlnet.errors import UserError
from lib_controlnet.settings import get_settings
from lib_controlnet.unit import ResizeMode


class PreprocessorError(UserError):
    """An unknown preprocessor, a parameter out of range, a missing weight file."""


@dataclasses.dataclass(frozen=True)
class Slider:
    """One slider as the other WebUI ControlNet extension's API describes it: {name, value, min, max, step}."""

    name: str
    min: float
    max: float
    value: float
    step: float = 0.01  # that extension's default step where a slider names none

    def as_dict(self) -> dict:
        return {"name": self.name, "value": self.value, "min": self.min, "max": self.max, "step": self.step}


# THE preprocessor resolution range: every surface (panel, API, CLI, unit payloads) checks against this one.
RESOLUTION = Slider("Resolution", 64, 2048, 512, 8)
REMOVE_NEAR = Slider("Remove Near %", 0, 100, 0, 0.1)
REMOVE_BACKGROUND = Slider("Remove Background %", 0, 100, 0, 0.1)
GAMMA = Slider("Gamma Correction", 0.1, 2.0, 1.0, 0.001)
VARIATION = Slider("Variation", 3.0, 32.0, 8.0, 1.0)
STYLE_FIDELITY = Slider("Style Fidelity (only for Balanced mode)", 0.0, 1.0, 0.5, 0.01)

AnnotatorFn = Callable[[np.ndarray, Params], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Preprocessor:
    name: str  # internal name, as in module_list
    label: str  # alias name, as in module_list?alias_names=true and in the panel
    control_type: str  # the control type whose list it opens by default under
    target: str  # "annotators.module:function", imported on first use (neural families import torch)
    resolution: Optional[Slider] = RESOLUTION
    threshold_a: Optional[Slider] = None
    threshold_b: Optional[Slider] = None
    model_free: bool = True  # True: no network, no weight file
    tags: tuple[str, ...] = ()  # other control types it is offered under
    pad_multiple: int = 1  # networks whose strides need sides divisible by this
    aliases: tuple[str, ...] = ()
    fixed_resolution: Optional[int] = None  # resized to this whatever the request says (no resolution slider)
    image_encoder: Optional[str] = None  # image prompts: the CLIP tower (annotators.clip_vision) encoding them
    runs_without_model: bool = False  # reference-only: the unit runs with model "None" (lib_controlnet.reference)

    def names(self) -> tuple[str, ...]:
        return (self.name, self.label) + self.aliases

    def sliders(self) -> list[Optional[dict]]:
        """module_detail's list: [resolution, threshold_a, threshold_b], None for a hidden slot, trailing Nones dropped."""
        slots = [self.resolution, self.threshold_a, self.threshold_b]
        while slots and slots[-1] is None:
            slots.pop()
        return [s.as_dict() if s else None for s in slots]

    def api_sliders(self) -> list[dict]:
        """module_detail's list: slider objects only, in the slots [resolution, threshold_a, threshold_b].

        Clients of the other WebUI ControlNet extension map these by position onto processor_res, threshold_a
        and threshold_b, and that extension lists a resolution slider first wherever thresholds follow (even for
        tile and recolor, where it does nothing). So a threshold never moves into the resolution slot here: a
        module without a resolution of its own shows the registry's resolution slider there, which it ignores.
        """
        thresholds = [self.threshold_a, self.threshold_b]
        while thresholds and thresholds[-1] is None:
            thresholds.pop()
        if None in thresholds:
            raise AssertionError(f"{self.name}: threshold_b without threshold_a cannot be listed by position")
        if not thresholds:
            return [self.resolution.as_dict()] if self.resolution else []
        return [(self.resolution or RESOLUTION).as_dict()] + [s.as_dict() for s in thresholds]

    def function(self) -> AnnotatorFn:
        module_name, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module_name), attr)


def _p(name, label, control_type, target, **kw) -> Preprocessor:
    return Preprocessor(name=name, label=label, control_type=control_type, target=target, **kw)


_E, _T, _C = "annotators.edges", "annotators.tile", "annotators.color"
_LINE_TAGS = ("Canny", "Lineart", "Scribble", "MLSD")

REGISTRY: tuple[Preprocessor, ...] = (
    _p("none", "none", "All", f"{_T}:identity", resolution=None),
    _p("invert", "invert (from white bg & black line)", "Lineart", f"{_E}:invert", tags=_LINE_TAGS,
       resolution=None),
    _p("canny", "canny", "Canny", f"{_E}:canny",
       threshold_a=Slider("Low Threshold", 1, 255, 100, 1), threshold_b=Slider("High Threshold", 1, 255, 200, 1)),
    _p("depth", "depth_midas", "Depth", "annotators.depth:midas", model_free=False, pad_multiple=32),
    _p("depth_leres", "depth_leres", "Depth", "annotators.depth:leres", model_free=False, pad_multiple=64,
       threshold_a=REMOVE_NEAR, threshold_b=REMOVE_BACKGROUND),
    _p("depth_leres++", "depth_leres++", "Depth", "annotators.depth:leres_boost", model_free=False, pad_multiple=64,
       threshold_a=REMOVE_NEAR, threshold_b=REMOVE_BACKGROUND),
    _p("depth_zoe", "depth_zoe", "Depth", "annotators.depth:zoe", model_free=False, pad_multiple=32),
    _p("depth_anything", "depth_anything", "Depth", "annotators.depth_anything:depth_anything", model_free=False),
    _p("depth_anything_v2", "depth_anything_v2", "Depth", "annotators.depth_anything:depth_anything_v2",
       model_free=False),
    _p("normal_map", "normal_midas", "NormalMap", "annotators.normal:midas_normal", model_free=False, pad_multiple=32,
       threshold_a=Slider("Normal Background Threshold", 0.0, 1.0, 0.4, 0.01)),
    _p("normal_bae", "normal_bae", "NormalMap", "annotators.normal:bae", model_free=False, pad_multiple=32),
    _p("normal_dsine", "normal_dsine", "NormalMap", "annotators.dsine:normal_dsine", model_free=False,
       threshold_a=Slider("Fov", 0.0, 360.0, 60.0, 0.1), threshold_b=Slider("Iterations", 1, 20, 5, 1)),
    _p("openpose", "openpose", "OpenPose", "annotators.pose:openpose", model_free=False),
    _p("openpose_face", "openpose_face", "OpenPose", "annotators.pose:openpose_face", model_free=False),
    _p("openpose_faceonly", "openpose_faceonly", "OpenPose", "annotators.pose:openpose_faceonly", model_free=False),
    _p("openpose_full", "openpose_full", "OpenPose", "annotators.pose:openpose_full", model_free=False),
    _p("openpose_hand", "openpose_hand", "OpenPose", "annotators.pose:openpose_hand", model_free=False),
    _p("dw_openpose_full", "dw_openpose_full", "OpenPose", "annotators.dwpose:dw_openpose_full", model_free=False),
    _p("animal_openpose", "animal_openpose", "OpenPose", "annotators.dwpose:animal_openpose", model_free=False),
    _p("lineart", "lineart_realistic", "Lineart", "annotators.lineart:realistic", model_free=False, pad_multiple=8),
    _p("lineart_coarse", "lineart_coarse", "Lineart", "annotators.lineart:coarse", model_free=False, pad_multiple=8),
    _p("lineart_anime", "lineart_anime", "Lineart", "annotators.lineart:anime", model_free=False),
    _p("lineart_anime_denoise", "lineart_anime_denoise", "Lineart", "annotators.manga_line:lineart_anime_denoise",
       model_free=False, pad_multiple=64),
    _p("lineart_standard", "lineart_standard (from white bg & black line)", "Lineart", f"{_E}:lineart_standard"),
    _p("hed", "softedge_hed", "SoftEdge", "annotators.softedge:hed", model_free=False),
    _p("hed_safe", "softedge_hedsafe", "SoftEdge", "annotators.softedge:hed_safe", model_free=False),
    _p("pidinet", "softedge_pidinet", "SoftEdge", "annotators.softedge:pidinet", model_free=False, pad_multiple=8),
    _p("pidinet_safe", "softedge_pidisafe", "SoftEdge", "annotators.softedge:pidinet_safe", model_free=False,
       pad_multiple=8),
    _p("te_hed", "softedge_teed", "SoftEdge", "annotators.softedge:teed", model_free=False, pad_multiple=8,
       threshold_a=Slider("Safe Steps", 0, 10, 2, 1)),
    _p("scribble_hed", "scribble_hed", "Scribble", "annotators.softedge:scribble_hed", model_free=False),
    _p("pidinet_scribble", "scribble_pidinet", "Scribble", "annotators.softedge:scribble_pidinet",
       model_free=False, pad_multiple=8),
    _p("scribble_xdog", "scribble_xdog", "Scribble", f"{_E}:scribble_xdog",
       threshold_a=Slider("XDoG Threshold", 1, 64, 32, 1)),
    _p("mediapipe_face", "mediapipe_face", "All", "annotators.mediapipe_face:mediapipe_face",
       threshold_a=Slider("Max Faces", 1, 10, 1, 1), threshold_b=Slider("Min Face Confidence", 0.01, 1.0, 0.5)),
    _p("mlsd", "mlsd", "MLSD", "annotators.mlsd:mlsd", model_free=False,
       threshold_a=Slider("MLSD Value Threshold", 0.01, 2.0, 0.1, 0.01),
       threshold_b=Slider("MLSD Distance Threshold", 0.01, 20.0, 0.1, 0.01)),
    _p("segmentation", "seg_ufade20k", "Segmentation", "annotators.seg:upernet_ade20k", model_free=False,
       pad_multiple=32),
    _p("oneformer_ade20k", "seg_ofade20k", "Segmentation", "annotators.seg:oneformer_ade20k", model_free=False),
    _p("oneformer_coco", "seg_ofcoco", "Segmentation", "annotators.seg:oneformer_coco", model_free=False),
    _p("anime_face_segment", "seg_anime_face", "Segmentation", "annotators.anime_face:anime_face", model_free=False),
    _p("shuffle", "shuffle", "Shuffle", "annotators.shuffle:shuffle", resolution=None, fixed_resolution=512),
    _p("tile_resample", "tile_resample", "Tile", f"{_T}:tile_resample", resolution=None,
       threshold_a=Slider("Down Sampling Rate", 1.0, 8.0, 1.0, 0.01)),
    _p("tile_colorfix", "tile_colorfix", "Tile", f"{_T}:identity", resolution=None, threshold_a=VARIATION),
    _p("tile_colorfix+sharp", "tile_colorfix+sharp", "Tile", f"{_T}:identity", resolution=None,
       threshold_a=VARIATION, threshold_b=Slider("Sharpness", 0.0, 2.0, 1.0, 0.01)),
    _p("blur_gaussian", "blur_gaussian", "Tile", f"{_E}:blur_gaussian",
       threshold_a=Slider("Sigma", 0.01, 64.0, 9.0)),
    _p("color", "t2ia_color_grid", "T2I-Adapter", f"{_C}:color_grid"),
    _p("pidinet_sketch", "t2ia_sketch_pidi", "T2I-Adapter", "annotators.softedge:pidinet_sketch", model_free=False,
       pad_multiple=8),
    _p("recolor_luminance", "recolor_luminance", "Recolor", f"{_C}:recolor_luminance", resolution=None,
       threshold_a=GAMMA),
    _p("recolor_intensity", "recolor_intensity", "Recolor", f"{_C}:recolor_intensity", resolution=None,
       threshold_a=GAMMA),
    _p("threshold", "threshold", "All", f"{_E}:threshold",
       threshold_a=Slider("Binarization Threshold", 0, 255, 127, 1)),
    _p("inpaint", "inpaint_global_harmonious", "Inpaint", "annotators.inpaint:inpaint", resolution=None),
    _p("inpaint_only", "inpaint_only", "Inpaint", "annotators.inpaint:inpaint", resolution=None),
    # Image prompts: the map is the image itself; its CLIP encoding is made once per job by the controller.
    _p("ip-adapter_clip_sd15", "ip-adapter_clip_h", "IP-Adapter", "annotators.clip_vision:preview", resolution=None,
       model_free=False, image_encoder="clip_h"),
    _p("ip-adapter_clip_sdxl_plus_vith", "ip-adapter_clip_sdxl_plus_vith", "IP-Adapter",
       "annotators.clip_vision:preview", resolution=None, model_free=False, image_encoder="clip_h"),
    _p("ip-adapter_clip_sdxl", "ip-adapter_clip_g", "IP-Adapter", "annotators.clip_vision:preview", resolution=None,
       model_free=False, image_encoder="clip_g"),
    _p("ip-adapter_face_id", "ip-adapter_face_id", "IP-Adapter", "annotators.clip_vision:preview", resolution=None,
       model_free=False, image_encoder="face_id"),
    _p("ip-adapter_face_id_plus", "ip-adapter_face_id_plus", "IP-Adapter", "annotators.clip_vision:preview",
       resolution=None, model_free=False, image_encoder="face_id_plus"),
    # picks the encoder / face pipeline from the chosen adapter's variant and widths, read from its keys
    _p("ip-adapter-auto", "ip-adapter-auto", "IP-Adapter", "annotators.clip_vision:preview", resolution=None,
       model_free=False, image_encoder="auto"),
    # T2I-Adapter style model: CLIP ViT-L/14's last hidden states of the reference image (lib_controlnet.style_attention)
    _p("t2ia_style_clipvision", "t2ia_style_clipvision", "T2I-Adapter", "annotators.clip_vision:preview",
       resolution=None, model_free=False, image_encoder="clip_vitl"),
    _p("inpaint_only+lama", "inpaint_only+lama", "Inpaint", "annotators.lama:inpaint_lama", resolution=None,
       model_free=False),
)
# Reference-only: the image itself is the reference; the style fidelity acts at sampling time.
REGISTRY += tuple(_p(name, name, "Reference", f"{_T}:identity", resolution=None, threshold_a=STYLE_FIDELITY,
                     runs_without_model=True)
                  for name in ("reference_only", "reference_adain", "reference_adain+attn"))

# The control types of the panel's radio, each with the preprocessor it selects by default (label).
CONTROL_TYPES: dict[str, str] = {
    "All": "none", "Canny": "canny", "Depth": "depth_midas", "NormalMap": "normal_bae",
    "OpenPose": "openpose_full", "MLSD": "mlsd", "Lineart": "lineart_standard (from white bg & black line)",
    "SoftEdge": "softedge_pidinet", "Scribble": "scribble_pidinet", "Segmentation": "seg_ofade20k",
    "Shuffle": "shuffle", "Tile": "tile_resample", "Inpaint": "inpaint_only", "InstructP2P": "none",
    "Recolor": "recolor_luminance", "T2I-Adapter": "none",
    "IP-Adapter": "ip-adapter_clip_h",
}
CONTROL_TYPES["Reference"] = "reference_only"

_BY_NAME: dict[str, Preprocessor] = {}
for _pre in REGISTRY:
    for _n in _pre.names():
        _BY_NAME[_n.lower()] = _pre


# ---------------------------------------------------------------- lookup


def get_preprocessor(name: Optional[str]) -> Preprocessor:
    key = (name or "none").strip().lower()
    try:
        return _BY_NAME[key]
    except KeyError:
        raise PreprocessorError(
            f"Unknown preprocessor {name!r}; `python -m lib_controlnet detect --list` shows the available ones."
        ) from None


def list_modules(alias_names: bool = False) -> list[str]:
    """Names in the panel's order: none first, then invert, then the rest alphabetically (by label)."""
    ordered = [REGISTRY[0], REGISTRY[1]] + sorted(REGISTRY[2:], key=lambda p: p.label)
    return [p.label if alias_names else p.name for p in ordered]


def module_detail(alias_names: bool = False) -> dict[str, dict]:
    """What `/controlnet/module_list` answers under "module_detail"."""
    out = {}
    for name in list_modules(alias_names):
        pre = get_preprocessor(name)
        # model_free, as that extension means it: runs without a ControlNet model (reference-only)
        out[name] = {"model_free": pre.runs_without_model, "sliders": pre.api_sliders(), "control_type": pre.control_type,
                     "needs_weights": not pre.model_free}
    return out


def control_types() -> dict[str, dict]:
    """Per control type: the preprocessor labels offered and the default one ("none" is offered everywhere).
    "All" first, then the types by name, as the other WebUI ControlNet extension orders them."""
    out = {}
    for ctype in ["All"] + sorted(t for t in CONTROL_TYPES if t != "All"):
        default = CONTROL_TYPES[ctype]
        if ctype == "All":
            labels = list_modules(alias_names=True)
        else:
            labels = ["none"] + [p.label for p in REGISTRY if p.name != "none"
                                 and (p.control_type == ctype or ctype in p.tags)]
        out[ctype] = {"module_list": labels, "default_option": default if default in labels else "none"}
    return out


# ---------------------------------------------------------------- resolution


def pixel_perfect_resolution(image_hw: Sequence[int], target_w: int, target_h: int,
                             resize_mode: ResizeMode | str | int = ResizeMode.INNER_FIT) -> int:
    """The preprocessor resolution at which the map lands on the generation size 1:1 after resize_to_target:
    the short side of the image scaled by the factor that mode applies (min for Resize and Fill, else max)."""
    mode = ResizeMode.parse(resize_mode, "resize_mode")
    raw_h, raw_w = int(image_hw[0]), int(image_hw[1])
    if raw_h <= 0 or raw_w <= 0 or target_w <= 0 or target_h <= 0:
        raise PreprocessorError("Pixel-perfect needs a non-empty image and target size.")
    k_h, k_w = float(target_h) / raw_h, float(target_w) / raw_w
    k = min(k_h, k_w) if mode is ResizeMode.OUTER_FIT else max(k_h, k_w)
    # within the one resolution range (reached only by targets beyond the WebUI's 2048 px sliders)
    return int(min(max(np.round(k * min(raw_h, raw_w)), RESOLUTION.min), RESOLUTION.max))


# ---------------------------------------------------------------- parameters

MIN_RESOLUTION, MAX_RESOLUTION = int(RESOLUTION.min), int(RESOLUTION.max)


def resolution_error(value: Any) -> Optional[str]:
    """Why `value` is not a preprocessor resolution (-1 is "the default"), or None; every surface asks this."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return f"must be a number, got {value!r}"
    if number == -1:
        return None
    if not MIN_RESOLUTION <= number <= MAX_RESOLUTION or number != int(number):  # (NaN fails the range)
        return f"must be -1 (the default) or a whole number from {MIN_RESOLUTION} to {MAX_RESOLUTION}, got {value}"
    return None


def _value(slider: Optional[Slider], given: Optional[float], label: str) -> float:
    if slider is None:
        return float(given) if given is not None and given != -1 else 0.0
    if given is None or given == -1:  # -1: the WebUI API's "use the default"
        return float(slider.value)
    try:
        value = float(given)
    except (TypeError, ValueError):
        raise PreprocessorError(f"{slider.name} must be a number, got {given!r}.") from None
    if not slider.min <= value <= slider.max:
        raise PreprocessorError(f"{slider.name} ({label}) must be between {slider.min} and {slider.max}, got {given}.")
    return value


def make_params(pre: Preprocessor, resolution=None, threshold_a=None, threshold_b=None,
                mask=None, seed: int = 0) -> Params:
    res = pre.resolution.value if pre.resolution else RESOLUTION.value
    if resolution is not None and resolution != -1:
        problem = resolution_error(resolution)
        if problem:
            raise PreprocessorError(f"The preprocessor resolution {problem}.")
        res = int(float(resolution))
    if pre.fixed_resolution:
        res = pre.fixed_resolution
    return Params(resolution=int(res), threshold_a=_value(pre.threshold_a, threshold_a, "threshold_a"),
                  threshold_b=_value(pre.threshold_b, threshold_b, "threshold_b"), mask=mask, seed=int(seed))


# ---------------------------------------------------------------- cache


class _LRU:
    def __init__(self):
        self._data: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
        return None

    def put(self, key, value) -> None:
        size = max(0, int(get_settings().preprocessor_cache_size))
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > size:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


_cache = _LRU()


def clear_cache() -> None:
    _cache.clear()


def _digest(array: Optional[np.ndarray]) -> Optional[str]:
    if array is None:
        return None
    h = hashlib.blake2b(np.ascontiguousarray(array).data, digest_size=16)
    h.update(repr((array.shape, array.dtype.str)).encode())
    return h.hexdigest()


# ---------------------------------------------------------------- running


def _as_rgb(image: Any) -> np.ndarray:
    # an HxWx3 uint8 array is used as is (annotators never write into their input): no copy
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return image
    return images.to_rgb_array(image)


def _prepare(pre: Preprocessor, img: np.ndarray, params: Params) -> tuple[np.ndarray, Params]:
    """Resize to the preprocessor resolution (mask alongside) before the annotator sees it."""
    if pre.resolution is not None or pre.fixed_resolution:
        img = resize_short_side(img, params.resolution)
    if params.mask is not None and params.mask.shape[:2] != img.shape[:2]:
        params = dataclasses.replace(params, mask=images.resize(params.mask, img.shape[1], img.shape[0]))
    return img, params


def _finish(result: np.ndarray, hw: Optional[tuple[int, int]]) -> np.ndarray:
    if hw is not None:
        result = result[: hw[0], : hw[1]]
    if result.dtype != np.uint8:
        result = result.clip(0, 255).astype(np.uint8)
    if result.ndim == 3 and result.shape[2] == 4:
        return np.ascontiguousarray(result)
    return np.ascontiguousarray(to_hwc3(result))


def _call(pre: Preprocessor, img: np.ndarray, params: Params) -> np.ndarray:
    fn = pre.function()
    hw = None
    if pre.pad_multiple > 1:
        img, hw = pad_to_multiple(img, pre.pad_multiple)
        if params.mask is not None:
            params = dataclasses.replace(params, mask=pad_to_multiple(params.mask, pre.pad_multiple)[0])
    return _finish(fn(img, params), hw)


def run(name: str, image: Any, resolution: Optional[int] = None, threshold_a: Optional[float] = None,
        threshold_b: Optional[float] = None, mask: Any = None, seed: int = 0, use_cache: bool = True) -> np.ndarray:
    """image (anything images.to_rgb_array reads) -> HxWx3 uint8 map at the preprocessor resolution.

    The one exception: inpaint preprocessors given a mask return HxWx4 (alpha 255 = repaint), which
    annotators.inpaint.to_control_hint turns into the model's hint.
    """
    pre = get_preprocessor(name)
    img = _as_rgb(image)
    mask_array = None
    if mask is not None:
        mask_array = images.decode_mask(mask, size=(img.shape[1], img.shape[0]))
    params = make_params(pre, resolution, threshold_a, threshold_b, mask_array, seed)
    key = None
    if use_cache:
        key = (pre.name, _digest(img), params.resolution, params.threshold_a, params.threshold_b,
               _digest(mask_array), params.seed, get_settings().annotator_precision)
        hit = _cache.get(key)
        if hit is not None:
            return hit.copy()
    img, params = _prepare(pre, img, params)
    result = _call(pre, img, params)
    if np.shares_memory(result, image if isinstance(image, np.ndarray) else result[:0]):
        result = result.copy()  # identity maps must not hand back (or cache) the caller's own array
    if key is not None:
        _cache.put(key, result)
        return result.copy()
    return result


def run_batch(name: str, images_in: Sequence[Any], resolution: Optional[int] = None,
              threshold_a: Optional[float] = None, threshold_b: Optional[float] = None,
              batch_size: int = 8) -> list[np.ndarray]:
    """Many images, one preprocessor (the dataset builder's path): no result cache; neural families that can
    batch run same-size images through the network together."""
    pre = get_preprocessor(name)
    params = make_params(pre, resolution, threshold_a, threshold_b)
    prepared = [_prepare(pre, _as_rgb(image), params)[0] for image in images_in]
    fn = pre.function()
    batched = getattr(fn, "batch", None)
    if batched is None or batch_size <= 1:
        return [_call(pre, img, params) for img in prepared]
    results: list[Optional[np.ndarray]] = [None] * len(prepared)
    groups: dict[tuple, list[int]] = collections.defaultdict(list)
    for index, img in enumerate(prepared):
        groups[img.shape].append(index)
    for indices in groups.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            padded = [pad_to_multiple(prepared[i], pre.pad_multiple) for i in chunk]
            maps = batched([p[0] for p in padded], params)
            for i, (_, hw), result in zip(chunk, padded, maps):
                results[i] = _finish(result, hw if pre.pad_multiple > 1 else None)
    return results  # type: ignore[return-value]


def detects_poses(name: str) -> bool:
    """Whether the preprocessor also gives keypoints (run_pose): its annotator says so by a `with_json`."""
    return hasattr(get_preprocessor(name).function(), "with_json")


def run_pose(name: str, image: Any, resolution: Optional[int] = None) -> tuple[np.ndarray, dict]:
    """A pose preprocessor's map plus its keypoints as JSON (canvas = the map's size): OpenPose JSON for people,
    the other WebUI ControlNet extension's AP-10K JSON for animals. Pose annotators say so by a `with_json`."""
    pre = get_preprocessor(name)
    with_json = getattr(pre.function(), "with_json", None)
    if with_json is None:
        raise PreprocessorError(f"{pre.label} does not detect poses; use one of the openpose preprocessors.")
    params = make_params(pre, resolution)
    img, _ = _prepare(pre, _as_rgb(image), params)
    canvas, keypoints = with_json(img)
    return _finish(canvas, None), keypoints
