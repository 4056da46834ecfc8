import os
import tempfile

# The WebUI's roots; tests point them at a temporary folder through CNET_STANDIN_ROOT.
script_path = os.environ.get("CNET_STANDIN_ROOT") or tempfile.mkdtemp(prefix="webui-standin-")
data_path = script_path
models_path = os.path.join(data_path, "models")
