"""WebUI 1.10 `modules.processing`, reduced: the processing classes with the real field names, `Processed`
with the real constructor, and `process_images` calling the script hooks in the WebUI's order around a
small CFG sampling loop on the real ldm UNet (see README.md)."""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from modules import script_callbacks, scripts, shared
from modules.shared import opts, state


@dataclass(repr=False)
class StableDiffusionProcessing:
    sd_model: object = None
    outpath_samples: str = None
    outpath_grids: str = None
    prompt: str = ""
    prompt_for_display: str = None
    negative_prompt: str = ""
    styles: list = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    seed_enable_extras: bool = True
    sampler_name: str = None
    scheduler: str = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool = None
    tiling: bool = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    extra_generation_params: dict = None
    overlay_images: list = None
    eta: float = None
    do_not_reload_embeddings: bool = False
    denoising_strength: float = 0
    ddim_discretize: str = None
    s_min_uncond: float = None
    s_churn: float = None
    s_tmax: float = None
    s_tmin: float = None
    s_noise: float = None
    override_settings: dict = None
    override_settings_restore_afterwards: bool = True
    sampler_index: int = None
    refiner_checkpoint: str = None
    refiner_switch_at: float = None
    token_merging_ratio = 0
    token_merging_ratio_hr = 0
    disable_extra_networks: bool = False

    scripts_value: Any = field(default=None, init=False)
    script_args_value: list = field(default=None, init=False)
    scripts_setup_complete: bool = field(default=False, init=False)
    comments: dict = None
    sampler: Any = field(default=None, init=False)
    is_using_inpainting_conditioning: bool = field(default=False, init=False)
    paste_to: tuple = field(default=None, init=False)
    is_hr_pass: bool = field(default=False, init=False)
    c: tuple = field(default=None, init=False)
    uc: tuple = field(default=None, init=False)
    step_multiplier: int = field(default=1, init=False)
    all_prompts: list = field(default=None, init=False)
    all_negative_prompts: list = field(default=None, init=False)
    all_seeds: list = field(default=None, init=False)
    all_subseeds: list = field(default=None, init=False)
    iteration: int = field(default=0, init=False)
    main_prompt: str = field(default=None, init=False)
    main_negative_prompt: str = field(default=None, init=False)
    prompts: list = field(default=None, init=False)
    negative_prompts: list = field(default=None, init=False)
    seeds: list = field(default=None, init=False)
    subseeds: list = field(default=None, init=False)
    extra_network_data: dict = field(default=None, init=False)
    user: str = field(default=None, init=False)
    sd_model_name: str = field(default=None, init=False)
    sd_model_hash: str = field(default=None, init=False)
    is_api: bool = field(default=False, init=False)

    def __post_init__(self):
        self.comments = {}
        self.styles = self.styles or []
        self.s_min_uncond = self.s_min_uncond if self.s_min_uncond is not None else opts.s_min_uncond
        self.extra_generation_params = self.extra_generation_params or {}
        self.override_settings = self.override_settings or {}

    @property
    def sd_model(self):
        return shared.sd_model

    @sd_model.setter
    def sd_model(self, value):
        pass

    @property
    def scripts(self):
        return self.scripts_value

    @scripts.setter
    def scripts(self, value):
        self.scripts_value = value

    @property
    def script_args(self):
        return self.script_args_value

    @script_args.setter
    def script_args(self, value):
        self.script_args_value = value

    def close(self):
        self.sampler = None
        self.c = None
        self.uc = None

    def setup_prompts(self):
        self.all_prompts = self.batch_size * self.n_iter * [self.prompt]
        self.all_negative_prompts = [self.negative_prompt] * len(self.all_prompts)
        self.main_prompt = self.all_prompts[0]
        self.main_negative_prompt = self.all_negative_prompts[0]


@dataclass(repr=False)
class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    enable_hr: bool = False
    denoising_strength: float = 0.75
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str = None
    hr_sampler_name: str = None
    hr_scheduler: str = None
    hr_prompt: str = ''
    hr_negative_prompt: str = ''
    force_task_id: str = None

    hr_upscale_to_x: int = field(default=0, init=False)
    hr_upscale_to_y: int = field(default=0, init=False)

    def __post_init__(self):
        super().__post_init__()
        if self.enable_hr:
            self.hr_upscale_to_x = self.hr_resize_x or int(self.width * self.hr_scale)
            self.hr_upscale_to_y = self.hr_resize_y or int(self.height * self.hr_scale)

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        generator = torch.Generator().manual_seed(int(seeds[0]))
        x = torch.randn((len(seeds), 4, self.height // 8, self.width // 8), generator=generator)
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(p=self, x=x, noise=x, c=conditioning,
                                                       uc=unconditional_conditioning)
        samples = _cfg_sample(self, x, conditioning, unconditional_conditioning, self.steps)
        if not self.enable_hr or state.interrupted:
            return samples
        self.is_hr_pass = True
        try:
            if self.scripts is not None:
                self.scripts.before_hr(self)
            samples = torch.nn.functional.interpolate(
                samples, size=(self.hr_upscale_to_y // 8, self.hr_upscale_to_x // 8), mode="nearest")
            if self.scripts is not None:
                self.scripts.process_before_every_sampling(p=self, x=samples, noise=samples, c=conditioning,
                                                           uc=unconditional_conditioning)
            steps = self.hr_second_pass_steps or self.steps
            return _cfg_sample(self, samples, conditioning, unconditional_conditioning, steps)
        finally:
            self.is_hr_pass = False


@dataclass(repr=False)
class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    init_images: list = None
    resize_mode: int = 0
    denoising_strength: float = 0.75
    image_cfg_scale: float = None
    mask: Any = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float = None
    latent_mask: Image.Image = None
    force_task_id: str = None

    image_mask: Any = field(default=None, init=False)

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        generator = torch.Generator().manual_seed(int(seeds[0]))
        init = np.asarray(self.init_images[0].convert("RGB").resize((self.width // 8, self.height // 8)))
        latent = torch.from_numpy(init).float().permute(2, 0, 1)[None] / 127.5 - 1.0
        latent = torch.cat([latent, latent[:, :1]], dim=1).repeat(len(seeds), 1, 1, 1)
        x = latent + torch.randn(latent.shape, generator=generator) * self.denoising_strength
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(p=self, x=x, noise=x, c=conditioning,
                                                       uc=unconditional_conditioning)
        steps = max(1, int(self.steps * self.denoising_strength))
        return _cfg_sample(self, x, conditioning, unconditional_conditioning, steps)


class Processed:
    def __init__(self, p: StableDiffusionProcessing, images_list, seed=-1, info="", subseed=None, all_prompts=None,
                 all_negative_prompts=None, all_seeds=None, all_subseeds=None, index_of_first_image=0,
                 infotexts=None, comments=""):
        self.images = images_list
        self.prompt = p.prompt
        self.negative_prompt = p.negative_prompt
        self.seed = seed
        self.info = info
        self.width = p.width
        self.height = p.height
        self.steps = p.steps
        self.batch_size = p.batch_size
        self.extra_generation_params = p.extra_generation_params
        self.index_of_first_image = index_of_first_image
        self.all_prompts = all_prompts or p.all_prompts or [self.prompt]
        self.all_seeds = all_seeds or p.all_seeds or [self.seed]
        self.infotexts = infotexts or [info]


def _quote(value):
    text = str(value)
    if ',' not in text and '\n' not in text and ':' not in text:
        return text
    import json
    return json.dumps(text, ensure_ascii=False)


def create_infotext(p, all_prompts, all_seeds, all_subseeds, comments=None, iteration=0, position_in_batch=0,
                    use_main_prompt=False, index=None, all_negative_prompts=None):
    index = position_in_batch + iteration * p.batch_size if index is None else index
    params = {"Steps": p.steps, "Sampler": p.sampler_name, "CFG scale": p.cfg_scale, "Seed": all_seeds[index],
              "Size": f"{p.width}x{p.height}", **p.extra_generation_params}
    text = ", ".join(k if k == v else f"{k}: {_quote(v)}" for k, v in params.items() if v is not None)
    negative = f"\nNegative prompt: {p.all_negative_prompts[index]}" if p.all_negative_prompts[index] else ""
    return f"{all_prompts[index]}{negative}\n{text}".strip()


def _conditioning(prompts, dim):
    rows = []
    for prompt in prompts:
        seed = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16)
        rows.append(torch.randn((8, dim), generator=torch.Generator().manual_seed(seed)))
    return torch.stack(rows)


class InterruptedException(BaseException):
    pass


def _cfg_denoise(p, x, c, uc, step, total):
    """One CFGDenoiser.forward: conditional rows first, unconditional rows last (WebUI 1.10's x_in)."""
    if state.interrupted or state.skipped:
        raise InterruptedException
    repeats = [1] * x.shape[0]
    x_in = torch.cat([torch.stack([x[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [x])
    timestep = torch.full((x_in.shape[0],), int(999 * (1 - step / total)), dtype=torch.long)
    params = script_callbacks.CFGDenoiserParams(x_in, None, timestep, step, total, c, uc, None)
    script_callbacks.cfg_denoiser_callback(params)
    x_in, context = params.x, torch.cat([params.text_cond, params.text_uncond])
    unet = shared.sd_model.model.diffusion_model
    if opts.batch_cond_uncond:
        out = unet(x_in, timesteps=timestep, context=context)
    else:
        out = torch.zeros_like(x_in)
        size = x.shape[0]
        for a in range(0, x_in.shape[0], size):
            out[a:a + size] = unet(x_in[a:a + size], timesteps=timestep[a:a + size], context=context[a:a + size])
    cond, uncond = out[:-x.shape[0]], out[-x.shape[0]:]
    return uncond + p.cfg_scale * (cond - uncond)


def _cfg_sample(p, x, c, uc, steps):
    state.sampling_steps = steps
    with torch.no_grad():
        for step in range(steps):
            state.sampling_step = step
            try:
                x = x - 0.05 * _cfg_denoise(p, x, c, uc, step, steps)
            except InterruptedException:
                break  # the WebUI's samplers return the last latent on interrupt
    return x


def process_images(p: StableDiffusionProcessing) -> Processed:
    if p.scripts is not None:
        p.scripts.before_process(p)
    return process_images_inner(p)


def process_images_inner(p: StableDiffusionProcessing) -> Processed:
    p.setup_prompts()
    seed = p.seed if p.seed != -1 else random.randrange(2**31)
    p.all_seeds = [seed + i for i in range(len(p.all_prompts))]
    p.all_subseeds = list(p.all_seeds)
    if p.scripts is not None:
        p.scripts.process(p)
    dim = shared.sd_model.context_dim
    infotexts, output_images = [], []
    for n in range(p.n_iter):
        p.iteration = n
        if state.interrupted:
            break
        sl = slice(n * p.batch_size, (n + 1) * p.batch_size)
        p.prompts, p.negative_prompts = p.all_prompts[sl], p.all_negative_prompts[sl]
        p.seeds, p.subseeds = p.all_seeds[sl], p.all_subseeds[sl]
        if p.scripts is not None:
            p.scripts.before_process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.subseeds)
            p.scripts.process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.subseeds)
        p.c, p.uc = _conditioning(p.prompts, dim), _conditioning(p.negative_prompts, dim)
        samples = p.sample(p.c, p.uc, p.seeds, p.subseeds, p.subseed_strength, p.prompts)
        x_samples = torch.nn.functional.interpolate(((samples[:, :3] + 1) / 2).clamp(0, 1), scale_factor=8.0)
        if p.scripts is not None:
            p.scripts.postprocess_batch(p, x_samples, batch_number=n)
        for i, x_sample in enumerate(x_samples):
            array = (255.0 * x_sample.permute(1, 2, 0).numpy()).round().astype(np.uint8)
            image = Image.fromarray(array)
            if p.scripts is not None:
                pp = scripts.PostprocessImageArgs(image)
                p.scripts.postprocess_image(p, pp)
                image = pp.image
            infotexts.append(create_infotext(p, p.all_prompts, p.all_seeds, p.all_subseeds, iteration=n,
                                             position_in_batch=i))
            output_images.append(image)
    res = Processed(p, output_images, p.all_seeds[0], infotexts[0] if infotexts else "", infotexts=infotexts)
    if p.scripts is not None:
        p.scripts.postprocess(p, res)
    return res
