"""Make `torchvision` importable next to a CPU-only torch whose torchvision was built for CUDA.

Such a torchvision fails at import with "operator torchvision::nms does not exist" because its
compiled ops cannot load; transformers and diffusers import it too, so everything breaks. We try
the import first (a working torchvision registers the ops itself, and declaring them twice kills
the process); only on that exact failure do we declare pure-torch `nms`/`qnms` and import again.
"""
from __future__ import annotations

import sys

_MISSING_OP = "torchvision::nms does not exist"
_library = None  # keeps the torch.library registration alive


def _nms(boxes, scores, iou_threshold: float):
    import torch

    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    x1, y1, x2, y2 = boxes.float().unbind(1)
    areas = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    order = scores.argsort(descending=True)
    keep = []
    while order.numel() > 0:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = (torch.minimum(x2[i], x2[rest]) - torch.maximum(x1[i], x1[rest])).clamp(min=0)
        h = (torch.minimum(y2[i], y2[rest]) - torch.maximum(y1[i], y1[rest])).clamp(min=0)
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter).clamp(min=1e-12)
        order = rest[iou <= iou_threshold]
    return torch.stack(keep) if keep else torch.empty(0, dtype=torch.int64, device=boxes.device)


def _qnms(boxes, scores, iou_threshold: float):
    return _nms(boxes.dequantize(), scores.dequantize(), iou_threshold)


def _declare_ops() -> None:
    global _library
    import torch

    _library = torch.library.Library("torchvision", "DEF")
    _library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _library.impl("nms", _nms, "CompositeExplicitAutograd")
    _library.impl("qnms", _qnms, "CompositeExplicitAutograd")


def ensure_torchvision() -> bool:
    """Import torchvision, repairing the CPU/CUDA mismatch if needed. Returns False if it is absent."""
    try:
        import torchvision  # noqa: F401
        return True
    except ModuleNotFoundError:
        return False
    except RuntimeError as error:
        if _MISSING_OP not in str(error):
            raise
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    _declare_ops()
    import torchvision.extension

    # nms/qnms now exist; other compiled ops still fail, naming the missing operator.
    torchvision.extension._has_ops = lambda: True
    return True


def torchvision_was_repaired() -> bool:
    return _library is not None
