"""Loaded control models (every kind) kept in memory, least recently used dropped first; size from
settings.model_cache_size."""
from __future__ import annotations

import collections
import threading
from pathlib import Path

from lib_controlnet.models.controlnet_loader import parse_dtype
from lib_controlnet.models.kinds import load_control_model
from lib_controlnet.models.registry import get_registry
from lib_controlnet.settings import get_settings


class ControlNetCache:
    def __init__(self):
        self._models: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.RLock()

    @staticmethod
    def _key(path: Path, dtype, device) -> tuple:
        stat = path.stat() if path.is_file() else (path / "config.json").stat()
        # A changed file (same name, new weights) must not be served from the cache.
        return str(path.resolve()), stat.st_mtime_ns, stat.st_size, str(dtype), str(device)

    def get(self, path: Path, dtype=None, device="cpu"):
        dtype = parse_dtype(dtype)
        key = self._key(path, dtype, device)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            model = load_control_model(path, dtype=dtype, device=device)
            size = max(0, int(get_settings().model_cache_size))
            if size:
                self._models[key] = model
                while len(self._models) > size:
                    self._models.popitem(last=False)
            return model

    def clear(self) -> None:
        with self._lock:
            self._models.clear()

    def __len__(self) -> int:
        return len(self._models)


_cache = ControlNetCache()


def get_cache() -> ControlNetCache:
    return _cache


def resolve(name_or_path) -> Path:
    """An existing file or folder as given, else a registry name (exact, stem or unique substring)."""
    candidate = Path(str(name_or_path)).expanduser()
    if str(name_or_path).strip() and candidate.exists():
        return candidate
    return get_registry().find(str(name_or_path))


def get_controlnet(name_or_path, dtype=None, device="cpu"):
    """The control model (ControlNetModel, T2IAdapter, ...) for a registry name or a path, loaded once and then
    served from the LRU cache."""
    return _cache.get(resolve(name_or_path), dtype=dtype, device=device)
