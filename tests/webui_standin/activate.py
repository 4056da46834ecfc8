"""Put the stand-in WebUI `modules` on sys.path for a block, rooted in a given folder, and take it away after (the
stand-in reads its roots at import, so later tests import it afresh with theirs)."""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

STANDIN = Path(__file__).resolve().parent


@contextlib.contextmanager
def standin_webui(root: Path):
    saved_root = os.environ.get("CNET_STANDIN_ROOT")
    os.environ["CNET_STANDIN_ROOT"] = str(root)
    sys.path.insert(0, str(STANDIN))
    try:
        yield
    finally:
        sys.path.remove(str(STANDIN))
        for name in [n for n in sys.modules if n == "modules" or n.startswith("modules.")]:
            del sys.modules[name]
        if saved_root is None:
            os.environ.pop("CNET_STANDIN_ROOT", None)
        else:
            os.environ["CNET_STANDIN_ROOT"] = saved_root
