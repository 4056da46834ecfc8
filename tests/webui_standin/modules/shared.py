"""WebUI 1.10 `modules.shared`: opts, cmd_opts, state, OptionInfo, sd_model."""
import argparse

from modules import devices, options
from modules.options import OptionInfo, options_section  # noqa: F401  (the WebUI re-exports both here)

cmd_opts = argparse.Namespace(
    controlnet_dir=None, controlnet_annotator_models_path=None, controlnet_no_half=False,
    controlnet_preprocessor_cache_size=None, api=False, nowebui=False, listen=False, lowvram=False, medvram=False,
)

# The WebUI's own options the extension may read (with their 1.10 defaults).
opts = options.Options({
    "samples_save": OptionInfo(True, "Always save all generated images"),
    "outdir_samples": OptionInfo("", "Output directory for images"),
    "batch_cond_uncond": OptionInfo(True, "Batch cond/uncond"),
    "s_min_uncond": OptionInfo(0.0, "Negative Guidance minimum sigma"),
    "s_churn": OptionInfo(0.0, "sigma churn"),
    "s_tmin": OptionInfo(0.0, "sigma tmin"),
    "s_tmax": OptionInfo(0.0, "sigma tmax"),
    "s_noise": OptionInfo(1.0, "sigma noise"),
    "persistent_cond_cache": OptionInfo(True, "Persistent cond cache"),
}, restricted_opts=set())


class State:
    skipped = False
    interrupted = False
    stopping_generation = False
    job = ""
    job_no = 0
    job_count = 0
    sampling_step = 0
    sampling_steps = 0

    def interrupt(self):
        self.interrupted = True

    def skip(self):
        self.skipped = True

    def begin(self, job="(unknown)"):
        self.interrupted = self.skipped = False
        self.job = job

    def end(self):
        self.job = ""


state = State()
sd_model = None
device = devices.device
demo = None
