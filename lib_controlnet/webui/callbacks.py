"""Registration with the WebUI's script_callbacks. `register()` is called by scripts/controlnet.py each time
the WebUI loads it: the WebUI clears all callbacks before (re)loading scripts."""
from __future__ import annotations

from lib_controlnet import api
from lib_controlnet.webui import infotext, payload_check, settings, tabs


def _on_app_started(demo, app) -> None:
    settings.sync()
    api.register_routes(app)
    payload_check.install(app)


def register(lifecycle) -> None:
    from modules import script_callbacks

    script_callbacks.on_ui_settings(settings.add_options, name="controlnet_studio_settings")
    script_callbacks.on_app_started(_on_app_started, name="controlnet_studio_api")
    script_callbacks.on_ui_tabs(tabs.build_tabs, name="controlnet_studio_tabs")
    script_callbacks.on_infotext_pasted(infotext.on_infotext_pasted, name="controlnet_studio_paste")
    script_callbacks.on_cfg_denoiser(lifecycle.on_cfg_denoiser, name="controlnet_studio_steps")
