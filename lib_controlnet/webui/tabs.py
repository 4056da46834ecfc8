"""The Dataset and Train tabs as WebUI top-level tabs (on_ui_tabs)."""
from __future__ import annotations


def build_tabs() -> list:
    import gradio as gr

    from lib_controlnet.train.runner import BackgroundTraining
    from lib_controlnet.ui.dataset_tab import build_dataset_tab
    from lib_controlnet.ui.train_tab import build_train_tab
    from lib_controlnet.webui import train_base

    with gr.Blocks(analytics_enabled=False) as dataset:
        build_dataset_tab()
    with gr.Blocks(analytics_enabled=False) as train:
        build_train_tab(BackgroundTraining(base_provider=train_base.loaded_checkpoint_base),
                        loaded_checkpoint=train_base.loaded_checkpoint_path)
    return [(dataset, "ControlNet Dataset", "controlnet_dataset_tab"),
            (train, "ControlNet Train", "controlnet_train_tab")]
