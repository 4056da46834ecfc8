"""The ControlNet models a user has: files and diffusers folders under the model folders, named "stem [hash8]".

The hash is the one the WebUI's other ControlNet extension shows (and writes into infotexts): the WebUI's
`sd_models.model_hash`, i.e. the first 8 hex digits of sha256 over the 64 KiB at offset 1 MiB. It reads
almost nothing, so listing stays instant, and names match what users already have in their PNG infotexts.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import threading
from pathlib import Path

from lib_controlnet.models.errors import ModelNotFoundError
from lib_controlnet.models.loading import DIFFUSERS_WEIGHT_NAMES, WEIGHT_SUFFIXES
from lib_controlnet.settings import get_settings

_HASH_SUFFIX = re.compile(r"\s*\[[0-9a-fA-F]{8,10}\]\s*$")


def legacy_short_hash(path: Path) -> str:
    """The WebUI's `model_hash(filename)`: sha256 of 64 KiB at offset 0x100000, first 8 hex digits."""
    with open(path, "rb") as handle:
        handle.seek(0x100000)
        return hashlib.sha256(handle.read(0x10000)).hexdigest()[:8]


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    name: str          # "stem [hash8]"
    stem: str
    path: Path         # the file, or the diffusers folder
    short_hash: str


def _diffusers_weights(folder: Path) -> Path | None:
    if not (folder / "config.json").is_file():
        return None
    return next((folder / n for n in DIFFUSERS_WEIGHT_NAMES if (folder / n).is_file()), None)


def _scan(root: Path, skip: set[Path]):
    """Weight files and diffusers folders under root, recursively; a diffusers folder counts as one model."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (here / d).resolve() not in skip)
        for name in list(dirnames):
            weights = _diffusers_weights(here / name)
            if weights is not None:
                dirnames.remove(name)  # its files belong to the folder model
                yield here / name, weights
        for name in sorted(filenames):
            if not name.startswith(".") and name.lower().endswith(WEIGHT_SUFFIXES):
                yield here / name, here / name


class ModelRegistry:
    def __init__(self, dirs=None):
        self._dirs = dirs  # None: the settings' model_dirs, read at every refresh
        self._entries: dict[str, ModelEntry] = {}
        self._hashes: dict[tuple, str] = {}
        self._lock = threading.Lock()
        self._scanned = False

    def dirs(self) -> list[Path]:
        return [Path(d) for d in (self._dirs if self._dirs is not None else get_settings().model_dirs)]

    def _hash(self, weights: Path) -> str:
        stat = weights.stat()
        key = (str(weights), stat.st_size, stat.st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = legacy_short_hash(weights)
        return self._hashes[key]

    def refresh(self) -> list[str]:
        skip = {Path(get_settings().annotator_models_path).resolve()}  # annotator weights live under models/
        entries: dict[str, ModelEntry] = {}
        seen: set[Path] = set()
        for root in self.dirs():
            if not root.is_dir():
                continue
            for path, weights in _scan(root, skip):
                real = path.resolve()
                if real in seen:
                    continue
                seen.add(real)
                try:
                    short = self._hash(weights)
                except OSError:
                    continue  # vanished or unreadable while scanning
                stem = path.name if path.is_dir() else path.stem
                entry = ModelEntry(f"{stem} [{short}]", stem, path, short)
                entries.setdefault(entry.name, entry)  # the first folder wins, as in the WebUI
        with self._lock:
            self._entries = dict(sorted(entries.items(), key=lambda item: item[0].lower()))
            self._scanned = True
        return list(self._entries)

    def _ensure(self) -> None:
        if not self._scanned:
            self.refresh()

    def entries(self) -> list[ModelEntry]:
        self._ensure()
        return list(self._entries.values())

    def names(self) -> list[str]:
        self._ensure()
        return list(self._entries)

    def _match(self, query: str) -> list[ModelEntry]:
        entries = list(self._entries.values())
        exact = [e for e in entries if e.name == query]
        if exact:
            return exact
        stem = _HASH_SUFFIX.sub("", query).strip().lower()
        by_stem = [e for e in entries if e.stem.lower() == stem]
        if by_stem:
            return by_stem
        return [e for e in entries if stem in e.name.lower()]

    def find(self, name: str) -> Path:
        """Path of the model called `name`: exact "stem [hash]", else stem, else a unique substring."""
        query = str(name or "").strip()
        if not query or query.lower() == "none":
            raise ModelNotFoundError("No ControlNet model was chosen.")
        self._ensure()
        found = self._match(query)
        if not found:  # a file added since the last scan
            self.refresh()
            found = self._match(query)
        if not found:
            folders = ", ".join(str(d) for d in self.dirs())
            raise ModelNotFoundError(f"No ControlNet model matches {query!r}; put the file in one of: {folders}.")
        if len(found) > 1:
            listed = ", ".join(e.name for e in found[:5]) + (" ..." if len(found) > 5 else "")
            raise ModelNotFoundError(f"{query!r} matches {len(found)} ControlNet models ({listed}); "
                                     "give the full name.")
        return found[0].path

    def name_of(self, path) -> str | None:
        """The "stem [hash]" name of a path, if the registry knows it."""
        self._ensure()
        real = Path(path).resolve()
        return next((e.name for e in self._entries.values() if e.path.resolve() == real), None)


_registry: ModelRegistry | None = None


def get_registry() -> ModelRegistry:
    global _registry
    if _registry is None:
        _registry = ModelRegistry()
    return _registry
