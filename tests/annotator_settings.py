"""The annotator folder (and any other settings) changed for a test or a module and restored afterwards, with
every loaded annotator network, cached map and CLIP tower forgotten on the way in and out, so nothing loaded from
one folder answers for another."""
from __future__ import annotations

import contextlib

from annotators import clip_vision, runtime
from lib_controlnet import preprocess
from lib_controlnet.settings import get_settings, update_settings


@contextlib.contextmanager
def annotator_folder(root, **settings):
    """`annotator_models_path=root` plus `settings` for the block; the previous values come back after it."""
    changes = dict(annotator_models_path=root, **settings)
    saved = {name: getattr(get_settings(), name) for name in changes}
    update_settings(**changes)
    _forget()
    try:
        yield root
    finally:
        update_settings(**saved)
        _forget()


def _forget() -> None:
    runtime.unload_all()
    preprocess.clear_cache()
    clip_vision._cache.clear()
