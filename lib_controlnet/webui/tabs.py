"""The Dataset and Train tabs as WebUI top-level tabs (on_ui_tabs), when their builders are present."""
from __future__ import annotations

import importlib
import logging

log = logging.getLogger(__name__)

TABS = (
    ("lib_controlnet.ui.dataset_tab", "build_dataset_tab", "ControlNet Dataset", "controlnet_dataset_tab"),
    ("lib_controlnet.ui.train_tab", "build_train_tab", "ControlNet Train", "controlnet_train_tab"),
)


def build_tabs() -> list:
    import gradio as gr

    tabs = []
    for module_name, builder_name, title, elem_id in TABS:
        try:
            builder = getattr(importlib.import_module(module_name), builder_name)
        except (ImportError, AttributeError) as error:
            log.warning("ControlNet: the %s tab is not available (%s)", title, error)
            continue
        with gr.Blocks(analytics_enabled=False) as block:
            builder()
        tabs.append((block, title, elem_id))
    return tabs
