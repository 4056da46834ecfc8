"""Test-wide set-up: offline, no telemetry, caches in a session folder, and the torchvision repair before
anything imports torchvision."""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("DISABLE_TELEMETRY", "1")

# Every cache a test could fill (datasets' Arrow cache, the hub, torch hub, anything following XDG) points into
# one folder of this session, set before those libraries read the variables at import. Set, not setdefault: a
# user's own HF_HOME must never receive test rows (a stale cached dataset is how issue 17 item 2 showed up).
_CACHE_ROOT = tempfile.mkdtemp(prefix="controlnet-studio-tests-")
atexit.register(shutil.rmtree, _CACHE_ROOT, True)
os.environ["HF_HOME"] = os.path.join(_CACHE_ROOT, "hf")
os.environ["HF_DATASETS_CACHE"] = os.path.join(_CACHE_ROOT, "hf", "datasets")
os.environ["HF_HUB_CACHE"] = os.path.join(_CACHE_ROOT, "hf", "hub")
os.environ["TORCH_HOME"] = os.path.join(_CACHE_ROOT, "torch")
os.environ["XDG_CACHE_HOME"] = os.path.join(_CACHE_ROOT, "xdg")

import lib_controlnet  # noqa: E402,F401  (repairs torchvision where needed)


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run ~10x faster on one thread on a shared 2-core machine, where two threads fight the other
    jobs; the previous count is restored after the module. Modules take it with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def no_grad():
    """Each test under torch.no_grad() (a module-level set_grad_enabled(False) would leak into every later test)."""
    with torch.no_grad():
        yield


@pytest.fixture()
def annotator_dir(tmp_path):
    """An empty annotator folder with downloads off, the loaded networks and map cache cleared before and after
    (a test module may define its own, filled, `annotator_dir`)."""
    from annotator_settings import annotator_folder

    with annotator_folder(tmp_path, allow_annotator_downloads=False):
        yield tmp_path
