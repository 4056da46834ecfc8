"""Real HTTP servers on 127.0.0.1 for dataset tests and benchmarks, each a subprocess that prints its port."""
from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


@contextlib.contextmanager
def serve(script: str, *args: str):
    """Start tests/servers/<script> on a free port; yields its base URL; stops it afterwards."""
    process = subprocess.Popen([sys.executable, str(HERE / script), *args], stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline().strip()
        if not line.startswith("PORT "):
            raise RuntimeError(f"{script} did not start: {line!r}")
        yield f"http://127.0.0.1:{line.split()[1]}"
    finally:
        process.kill()
        process.wait()
