"""Loaded control models (every kind) kept in memory, least recently used dropped first; size from
settings.model_cache_size."""
from __future__ import annotations

from pathlib import Path

from lib_controlnet.models.controlnet_loader import parse_dtype
from lib_controlnet.models.kinds import load_control_model
from lib_controlnet.models.lru import ModelLru
from lib_controlnet.models.registry import get_registry


class ControlNetCache(ModelLru):
    @staticmethod
    def _key(path: Path, dtype, device) -> tuple:
        stat = path.stat() if path.is_file() else (path / "config.json").stat()
        # A changed file (same name, new weights) must not be served from the cache.
        return str(path.resolve()), stat.st_mtime_ns, stat.st_size, str(dtype), str(device)

    def get(self, path: Path, dtype=None, device="cpu"):
        dtype = parse_dtype(dtype)
        return super().get(self._key(path, dtype, device),
                           lambda: load_control_model(path, dtype=dtype, device=device))


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
