"""Models kept in memory by key, least recently used dropped first; as many as settings.model_cache_size allows
(0: nothing kept). Shared by the file cache (models/cache.py) and the Control-LoRA merges built from a base."""
from __future__ import annotations

import collections
import threading


class ModelLru:
    def __init__(self):
        self._models: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.RLock()

    def get(self, key, build):
        """The model under `key`, built by `build()` the first time."""
        from lib_controlnet.settings import get_settings

        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            model = build()
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
