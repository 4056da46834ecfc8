"""A network that controlnet-aux's own pipeline code calls (and reads back with .numpy(), which bfloat16
tensors do not support): run it under the precision setting's autocast and hand back float32 outputs."""
from __future__ import annotations

import torch

from annotators.runtime import inference


def _as_float32(value):
    if torch.is_tensor(value):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_as_float32(v) for v in value)
    return value


class LowPrecisionForward(torch.nn.Module):
    """Wraps `network`; its forward autocasts to bfloat16 when the setting allows it, outputs are float32."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, *args, **kwargs):
        with inference(low_precision=True):
            return _as_float32(self.network(*args, **kwargs))  # no copy when already float32
