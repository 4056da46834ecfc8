"""ControlNet Studio: control, dataset building and training for ControlNet, in the WebUI and standalone."""
from lib_controlnet.compat import ensure_torchvision as _ensure_torchvision

_ensure_torchvision()

__version__ = "0.1.0"
