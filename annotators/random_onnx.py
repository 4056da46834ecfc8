"""Small ONNX files under the real release names (yolox_l.onnx, dw-ll_ucoco_384.onnx, rtmpose-m_ap10k_256.onnx)
with the real input and output names and shapes, for tests, benchmarks and demos without the real files.

The detector is not random everywhere: its objectness and class scores follow each cell's colour (red cells are
people, green cells dogs) so that a test can place people and animals, leave an image empty, or give the detector
candidates without a confident box. Box sizes and all keypoint heads come from random weights.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

DETECTOR = "yolox_l.onnx"
WHOLE_BODY = "dw-ll_ucoco_384.onnx"
ANIMAL = "rtmpose-m_ap10k_256.onnx"
PERSON_CLASS, DOG_CLASS = 0, 16


def _modules():
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Detector(nn.Module):
        """images [1, 3, 640, 640] (0..255) -> output [1, 8400, 85]: per anchor (stride 8, 16, 32 grids) the cell
        offset, log box size, objectness and 80 class scores, as YOLOX's ONNX export lays them out."""

        def __init__(self, width: int, depth: int):
            super().__init__()
            self.stem = nn.Conv2d(3, width, 8, stride=8)
            self.body = nn.Sequential(*[m for _ in range(depth) for m in (nn.Conv2d(width, width, 3, padding=1),
                                                                          nn.ReLU())])
            self.head = nn.Conv2d(width + 3, 85, 1)
            with torch.no_grad():
                self.head.weight.mul_(0.1)
                self.head.bias.zero_()
                self.head.bias[2:4] = 2.2  # boxes of about 9 cells
                colour = self.head.weight[:, width:, 0, 0]  # the last 3 inputs are the cell's mean r, g, b
                colour.zero_()
                colour[4, :2] = 10.0  # objectness: a bright red or green cell
                self.head.bias[4] = -6.0
                self.head.bias[5:] = -8.0
                colour[5 + PERSON_CLASS, :2] = torch.tensor([10.0, -5.0])
                colour[5 + DOG_CLASS, :2] = torch.tensor([-5.0, 10.0])
                self.head.bias[5 + PERSON_CLASS] = self.head.bias[5 + DOG_CLASS] = -4.0

        def forward(self, images):
            x = images / 255.0
            features = torch.cat([self.body(torch.relu(self.stem(x))), F.avg_pool2d(x, 8)], 1)
            rows = [self.head(F.avg_pool2d(features, k) if k > 1 else features).flatten(2) for k in (1, 2, 4)]
            rows[0][:, 4] -= 20.0  # only the stride-32 level finds objects: a few large boxes, as YOLOX-L gives
            rows[1][:, 4] -= 20.0
            out = torch.cat(rows, 2).transpose(1, 2)
            return torch.cat([torch.tanh(out[..., :2]), out[..., 2:4].clamp(-2, 4), torch.sigmoid(out[..., 4:])], -1)

    class SimCC(nn.Module):
        """input [N, 3, H, W] (normalised) -> simcc_x [N, K, 2W], simcc_y [N, K, 2H]: RTMPose's SimCC head
        layout, two bins per input pixel."""

        def __init__(self, keypoints: int, width: int, depth: int):
            super().__init__()
            self.stem = nn.Conv2d(3, width, 4, stride=4)
            self.body = nn.Sequential(*[m for _ in range(depth) for m in (nn.Conv2d(width, width, 3, padding=1),
                                                                          nn.ReLU())])
            self.head = nn.Conv2d(width, keypoints, 1)
            # a slope per keypoint along each axis: where a crop runs off the image the profile is flat, and a
            # flat profile's arg-max would be decided by float noise (differing between batch sizes)
            self.register_buffer("tilt", torch.randn(keypoints, 1) * 0.05)

        def forward(self, input):
            maps = self.head(self.body(torch.relu(self.stem(input))))
            h, w = input.shape[2], input.shape[3]
            simcc_x = F.interpolate(maps.mean(2), size=2 * w, mode="linear", align_corners=False)
            simcc_y = F.interpolate(maps.mean(3), size=2 * h, mode="linear", align_corners=False)
            return (simcc_x + self.tilt * torch.linspace(0, 1, 2 * w),
                    simcc_y + self.tilt * torch.linspace(0, 1, 2 * h))

    return Detector, SimCC


@contextlib.contextmanager
def _exporter_without_onnx_package():
    """torch's TorchScript exporter hands every graph to the `onnx` package only to insert onnxscript functions;
    these graphs have none, and `onnx` does not install beside the WebUI's protobuf 3.20 pin."""
    from torch.onnx._internal.torchscript_exporter import onnx_proto_utils

    saved = onnx_proto_utils._add_onnxscript_fn
    onnx_proto_utils._add_onnxscript_fn = lambda model_bytes, custom_opsets: model_bytes
    try:
        yield
    finally:
        onnx_proto_utils._add_onnxscript_fn = saved


def _export(module, shape, input_name, output_names, dynamic_batch: bool) -> bytes:
    import warnings

    import torch

    buffer = io.BytesIO()
    axes = {input_name: {0: "batch"}, **{n: {0: "batch"} for n in output_names}} if dynamic_batch else None
    with _exporter_without_onnx_package(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notice that it is the legacy one
        torch.onnx.export(module.eval(), (torch.zeros(shape),), buffer, dynamo=False, input_names=[input_name],
                          output_names=list(output_names), dynamic_axes=axes)
    return buffer.getvalue()


def write(directory: Path, names=None, seed: int = 0, width: int = 8, depth: int = 0,
          dynamic_batch: bool = True) -> list[Path]:
    """Save the ONNX files for `names` (default: all three) into `directory`; returns the paths. `width` and
    `depth` (extra 3x3 convolutions) make the networks heavier for benchmarks."""
    import torch

    detector, simcc = _modules()
    specs = {
        DETECTOR: lambda: _export(detector(width, depth), (1, 3, 640, 640), "images", ["output"], False),
        WHOLE_BODY: lambda: _export(simcc(133, width, depth), (1, 3, 384, 288), "input", ["simcc_x", "simcc_y"],
                                    dynamic_batch),
        ANIMAL: lambda: _export(simcc(17, width, depth), (1, 3, 256, 256), "input", ["simcc_x", "simcc_y"],
                                dynamic_batch),
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names or specs:
        torch.manual_seed(seed)
        path = directory / name
        if not path.exists():
            path.write_bytes(specs[name]())
        written.append(path)
    return written
