"""WebUI 1.10 `modules.script_callbacks`: registration functions with the real signatures and the
dispatchers the WebUI calls (each callback's exception reported, not raised, as in the WebUI)."""
import dataclasses
import traceback
from typing import Any


class CFGDenoiserParams:
    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond,
                 denoiser=None):
        self.x = x
        self.image_cond = image_cond
        self.sigma = sigma
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.text_cond = text_cond
        self.text_uncond = text_uncond
        self.denoiser = denoiser


@dataclasses.dataclass
class ScriptCallback:
    script: str
    callback: Any
    name: str = None


callback_map = dict(
    callbacks_app_started=[], callbacks_model_loaded=[], callbacks_ui_tabs=[], callbacks_ui_settings=[],
    callbacks_cfg_denoiser=[], callbacks_infotext_pasted=[], callbacks_script_unloaded=[],
    callbacks_before_ui=[], callbacks_after_component=[],
)
errors_reported = []  # tests look here: the WebUI prints these and carries on


def clear_callbacks():
    for callback_list in callback_map.values():
        callback_list.clear()


def add_callback(callbacks, fun, *, name=None, category='unknown'):
    callbacks.append(ScriptCallback("extension", fun, f"controlnet/{category}/{name}"))


def _report(c, job):
    errors_reported.append((job, traceback.format_exc()))


def _run(key, *args):
    results = []
    for c in callback_map[key]:
        try:
            results.append(c.callback(*args))
        except Exception:
            _report(c, key)
    return results


def app_started_callback(demo, app):
    _run('callbacks_app_started', demo, app)


def model_loaded_callback(sd_model):
    _run('callbacks_model_loaded', sd_model)


def ui_tabs_callback():
    res = []
    for item in _run('callbacks_ui_tabs'):
        res += item or []
    return res


def ui_settings_callback():
    _run('callbacks_ui_settings')


def cfg_denoiser_callback(params: CFGDenoiserParams):
    _run('callbacks_cfg_denoiser', params)


def infotext_pasted_callback(infotext: str, params: dict):
    _run('callbacks_infotext_pasted', infotext, params)


def script_unloaded_callback():
    _run('callbacks_script_unloaded')


def on_app_started(callback, *, name=None):
    add_callback(callback_map['callbacks_app_started'], callback, name=name, category='app_started')


def on_model_loaded(callback, *, name=None):
    add_callback(callback_map['callbacks_model_loaded'], callback, name=name, category='model_loaded')


def on_ui_tabs(callback, *, name=None):
    add_callback(callback_map['callbacks_ui_tabs'], callback, name=name, category='ui_tabs')


def on_ui_settings(callback, *, name=None):
    add_callback(callback_map['callbacks_ui_settings'], callback, name=name, category='ui_settings')


def on_cfg_denoiser(callback, *, name=None):
    add_callback(callback_map['callbacks_cfg_denoiser'], callback, name=name, category='cfg_denoiser')


def on_infotext_pasted(callback, *, name=None):
    add_callback(callback_map['callbacks_infotext_pasted'], callback, name=name, category='infotext_pasted')


def on_script_unloaded(callback, *, name=None):
    add_callback(callback_map['callbacks_script_unloaded'], callback, name=name, category='script_unloaded')


def on_before_ui(callback, *, name=None):
    add_callback(callback_map['callbacks_before_ui'], callback, name=name, category='before_ui')
