"""ControlNet Studio's WebUI entry point: an always-visible "ControlNet" script. Thin on purpose: every call
goes to lib_controlnet.webui."""
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import lib_controlnet  # noqa: E402,F401  (first: repairs torchvision before anything imports it)
# The WebUI restores its own sys.path list once a script has loaded, so the root added above is gone by the time
# a preprocessor is first used; importing the package now keeps `annotators.*` resolvable through sys.modules.
import annotators  # noqa: E402,F401
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

    def process_batch(self, p, *args, **kwargs):
        _lifecycle.before_sampling(p)

    def process_before_every_sampling(self, p, *args, **kwargs):
        _lifecycle.before_sampling(p)

    def before_hr(self, p, *args):
        _lifecycle.before_sampling(p, hires=True)

    def postprocess(self, p, processed, *args):
        _lifecycle.postprocess(p, processed, *args)


callbacks.register(_lifecycle)
