"""ControlNet Studio's WebUI entry point: an always-visible "ControlNet" script. Thin on purpose: every call
goes to lib_controlnet.webui."""
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import lib_controlnet  # noqa: E402,F401  (first: repairs torchvision before anything imports it)
from modules import scripts  # noqa: E402

from lib_controlnet.webui import callbacks  # noqa: E402
from lib_controlnet.webui.lifecycle import TITLE, Lifecycle  # noqa: E402

_lifecycle = Lifecycle()


class ControlNetScript(scripts.Script):
    sorting_priority = 10

    def title(self):
        return TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def after_component(self, component, **kwargs):
        _lifecycle.after_component(component, kwargs.get("elem_id"))

    def ui(self, is_img2img):
        return _lifecycle.ui(self, is_img2img)

    def process(self, p, *args):
        _lifecycle.process(p, *args)

    def process_before_every_sampling(self, p, *args, **kwargs):
        _lifecycle.process_before_every_sampling(p, *args, **kwargs)

    def postprocess(self, p, processed, *args):
        _lifecycle.postprocess(p, processed, *args)


callbacks.register(_lifecycle)
