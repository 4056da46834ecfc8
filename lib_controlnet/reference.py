"""Reference-only control (`reference_only`, `reference_adain`, `reference_adain+attn`): no model file.

Each UNet call, the reference image's latent, noised to the call's timestep, first goes through the same UNet
(the *reference pass*), which records:
- attention: the input of every self-attention layer (attn1, after norm1), for layers whose weight the unit's
  weight exceeds. Layers are ordered by channels, widest first; layer i of n has weight i/n, so weight 1 records
  every layer and weight 0.5 the wider half;
- AdaIN: the per-channel mean and variance of the outputs of the middle block (weight 0), of the encoder blocks
  below full resolution (weights 2(1 - w/n): deepest last) and of the first decoder blocks (weights 2w/n).
The real pass then reads them: a self-attention layer attends over [its own tokens, the reference's tokens],
and a block's output is renormalised to the reference's statistics (AdaIN). The *style fidelity* blends, on
the unconditional rows only, that result with the layer's plain one: fidelity 1 keeps the unconditional rows
plain (the reference then acts through CFG alone), fidelity 0 reads the reference everywhere. As users of the
other WebUI ControlNet extension know it: Balanced uses the slider "Style Fidelity (only for Balanced mode)"
(default 0.5; on SDXL cubed, 0.5 -> 0.125), "ControlNet is more important" uses 1, "My prompt is more
important" and the hires-fix pass use 0.

This module knows no host: hosts/ldm.py and hosts/diffusers.py hand over the attention layers and AdaIN blocks
of their UNet (`ReferenceHooks`) and a way to run the plain UNet; it puts module hooks on those (never a
replaced `forward`), and they come off with the host's other hooks. Each reference pass records only its own
unit (the other extension lets a second unit's pass read and drop the first one's records; not here).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import torch

ATTENTION, ADAIN = "attention", "adain"
# preprocessor name -> what its reference pass records
MODES: dict[str, tuple[str, ...]] = {
    "reference_only": (ATTENTION,),
    "reference_adain": (ADAIN,),
    "reference_adain+attn": (ADAIN, ATTENTION),
}
DEFAULT_STYLE_FIDELITY = 0.5
ADAIN_EPS = 1e-6
FIDELITY_EPS = 1e-5  # below this, the unconditional rows are not computed a second time
# number of UNet input blocks -> (encoder blocks, decoder blocks) whose output statistics AdaIN records
# (SD1.x/SD2.x: 12 input blocks; SDXL: 9), as the other extension picks them
ADAIN_BLOCKS: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {
    12: ((4, 5, 7, 8, 10, 11), tuple(range(8))),
    9: ((4, 5, 7, 8), tuple(range(6))),
}


def is_reference(module: Optional[str]) -> bool:
    return (module or "").strip().lower() in MODES


class ReferenceModel(torch.nn.Module):
    """A reference unit's "model": there is no file; it names what the unit's reference pass records."""

    def __init__(self, module: str):
        super().__init__()
        self.module_name = module.strip().lower()
        self.records = MODES[self.module_name]

    def extra_repr(self) -> str:
        return self.module_name


def style_fidelity(unit, sdxl: bool, hires: bool) -> float:
    from lib_controlnet.unit import ControlMode

    if unit.control_mode == ControlMode.CONTROL:
        return 1.0
    if unit.control_mode == ControlMode.PROMPT or hires:
        return 0.0
    value = DEFAULT_STYLE_FIDELITY if unit.threshold_a == -1 else min(max(float(unit.threshold_a), 0.0), 1.0)
    return value ** 3 if sdxl else value  # SDXL's attention reads the reference much harder


# ---------------------------------------------------------------- AdaIN and the layers' weights


def statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row and channel: (mean, variance) over the spatial dimensions (population variance)."""
    var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
    return mean, var


def read_adain(x: torch.Tensor, recorded: list[tuple[torch.Tensor, torch.Tensor]], fidelity: float,
               uc_rows: Optional[torch.Tensor]) -> torch.Tensor:
    """`x` renormalised to the mean of the recorded (mean, variance) pairs."""
    mean, var = statistics(x)
    ref_mean = sum(m for m, _ in recorded) / len(recorded)
    ref_var = sum(v for _, v in recorded) / len(recorded)
    std = var.clamp_min(ADAIN_EPS).sqrt()
    ref_std = ref_var.clamp_min(ADAIN_EPS).sqrt()
    out = (x - mean) / std * ref_std + ref_mean
    if uc_rows is not None and len(uc_rows) and fidelity > FIDELITY_EPS:
        out[uc_rows] = fidelity * x[uc_rows].to(out.dtype) + (1.0 - fidelity) * out[uc_rows]
    return out.to(x.dtype)


def attention_weights(blocks: list) -> list[float]:
    """Weight of each transformer block (in the UNet's order): i/n by channels, widest first (ties: UNet order)."""
    order = sorted(range(len(blocks)), key=lambda i: -blocks[i].norm1.normalized_shape[0])
    weights = [0.0] * len(blocks)
    for rank, index in enumerate(order):
        weights[index] = rank / len(blocks)
    return weights


def adain_layers(middle, encoder: dict, decoder: dict, n_inputs: int) -> list[tuple[Any, float]]:
    """(module, weight) for AdaIN. `encoder` / `decoder` map the ldm input / output block index to the module
    whose output is that block's output."""
    if n_inputs not in ADAIN_BLOCKS:
        from lib_controlnet.control_units import ControlError

        raise ControlError(f"reference_adain needs an SD1.x, SD2.x or SDXL UNet; this one has {n_inputs} input "
                           "blocks.")
    inputs, outputs = ADAIN_BLOCKS[n_inputs]
    layers = [(middle, 0.0)]
    layers += [(encoder[k], 2.0 * (1.0 - w / len(inputs))) for w, k in enumerate(inputs)]
    layers += [(decoder[k], 2.0 * w / len(outputs)) for w, k in enumerate(outputs)]
    return layers


def check_units(units) -> None:
    """Reference units read attn1 over [own, reference] tokens. ControlNet-LLLite conditions attn1's q/k/v inputs
    token by token on the image's grid, which that doubled context does not fit: the two do not share a job.
    (IP-Adapter acts on attn2, and its FaceID LoRA on any tokens of any rows: it runs beside reference units.)"""
    from lib_controlnet.control_units import ControlError
    from lib_controlnet.models.kinds.lllite import LLLITE

    other = next((p for p in units if p.kind is LLLITE), None)
    if other is not None:
        raise ControlError(f"A reference unit cannot run in the same job as the {other.kind.name} unit "
                           f"'{other.unit.model}'; use them in separate generations.")


# ---------------------------------------------------------------- per call: the passes the controller plans


@dataclasses.dataclass
class ReferencePass:
    """One unit's reference pass for one UNet call: the noised reference, one row per row of the call."""

    sample: torch.Tensor
    attention_weight: Optional[float]  # None: this unit records no attention
    adain_weight: Optional[float]
    fidelity: float


def plan_passes(controller, call, rows) -> list[ReferencePass]:
    """The reference passes of the units active at this step (weight 0 records nothing: no pass)."""
    from lib_controlnet.control import _image_rows, _pick
    from lib_controlnet.control_units import ControlError

    job = controller.job
    passes = []
    for prepared in controller.units:
        model = prepared.model
        if not isinstance(model, ReferenceModel) or prepared.unit.weight == 0 or not controller.is_active(prepared):
            continue
        if job.encode_latent is None or job.alphas_cumprod is None:
            raise ControlError(f"{model.module_name} needs the base model's VAE and noise schedule, which this "
                               "generation did not give.")
        height, width = call.sample.shape[-2] * 8, call.sample.shape[-1] * 8
        key = ("reference latent", width, height)
        cache = prepared._embeddings
        if key not in cache:
            cache.clear()
            with torch.no_grad():
                cache[key] = job.encode_latent(prepared.hint(width, height)).float().cpu()
        latent = cache[key]
        if tuple(latent.shape[-2:]) != tuple(call.sample.shape[-2:]):
            raise ControlError(f"{model.module_name}: the reference latent is {tuple(latent.shape[-2:])}, the "
                               f"UNet's input {tuple(call.sample.shape[-2:])}.")
        noise = torch.randn(latent.shape, generator=controller.reference_generator())
        images = _image_rows(rows, slice(None))
        alphas = torch.as_tensor(job.alphas_cumprod).detach().float().cpu()
        t = call.timestep
        t = torch.as_tensor(t).detach().float().cpu().round().long().clamp(0, len(alphas) - 1)
        a = alphas[t].reshape(-1, 1, 1, 1)
        noised = a.sqrt() * _pick(latent, images) + (1 - a).sqrt() * _pick(noise, images)
        if call.sample.shape[1] == 2 * latent.shape[1] + 1:
            # an inpainting UNet (latent, mask, masked image): the reference is unmasked, as the other extension
            # feeds it
            clean = _pick(latent, images)
            noised = torch.cat([noised, torch.zeros_like(clean[:, :1]), clean], dim=1)
        unit = prepared.unit
        sdxl = call.y is not None or call.text_embeds is not None
        passes.append(ReferencePass(
            sample=noised.to(device=call.sample.device, dtype=call.sample.dtype),
            attention_weight=unit.weight if ATTENTION in model.records else None,
            adain_weight=unit.weight if ADAIN in model.records else None,
            fidelity=style_fidelity(unit, sdxl, controller.hires_pass)))
    return passes


# ---------------------------------------------------------------- the hooks on one UNet

_WRITE, _READ = "write", "read"


class _Recorded(Exception):
    """Ends a reference pass early: every layer it records has recorded."""


class ReferenceHooks:
    """Records in the reference pass and reads in the real pass, through module hooks on a host's layers.

    attention: (attn1 module, weight) of the self-attention layers; `context_kwarg` is the keyword by which the
    host's transformer block passes attn1 its context (ldm/sgm "context", diffusers "encoder_hidden_states").
    adain: (module, weight) whose output is an ldm block's output.
    """

    def __init__(self, attention: list, adain: list, context_kwarg: str):
        self.attention, self.adain, self.context_kwarg = attention, adain, context_kwarg
        self.handles: list = []
        self.reset()

    def reset(self) -> None:
        self.mode: Optional[str] = None
        self.writing: Optional[ReferencePass] = None
        self.attention_bank: dict[int, list] = {}
        self.adain_bank: dict[int, list] = {}
        self.reading: dict[int, tuple] = {}
        self.uc_rows: Optional[torch.Tensor] = None
        self.plain = False  # True while a layer runs again without the reference (style fidelity)

    def install(self) -> list:
        try:
            for index, (module, _) in enumerate(self.attention):
                self.handles.append(module.register_forward_pre_hook(self._attention_pre(index), with_kwargs=True))
                self.handles.append(module.register_forward_hook(self._attention_post(index), with_kwargs=True))
            for index, (module, _) in enumerate(self.adain):
                # prepend: the statistics are the block's own, before a ControlNet / adapter adds to its output
                self.handles.append(module.register_forward_hook(self._adain_hook(index), prepend=True))
        except BaseException:
            self.remove()
            raise
        return self.handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.reset()

    # driven by the host's UNet pre-hook
    def run(self, passes: list[ReferencePass], rows, run_unet: Callable[[torch.Tensor], Any]) -> None:
        """Record every pass with `run_unet(sample)` (the plain UNet), then arm reading for the real pass. A pass
        stops once its last layer has recorded: what the UNet computes after that is never read (reference_adain
        skips the full-resolution decoder blocks; a weight below 1 skips the narrow, high-resolution layers)."""
        self.reset()
        if not passes:
            return
        for reference in passes:
            self.mode, self.writing = _WRITE, reference
            self.to_record = self._records(reference)
            try:
                with torch.no_grad():
                    run_unet(reference.sample)
            except _Recorded:
                pass
            finally:
                self.mode, self.writing = None, None
        uc = [i for i, cond in enumerate(rows.cond) if not cond]
        self.uc_rows = torch.tensor(uc, dtype=torch.long, device=passes[0].sample.device) if uc else None
        self.mode = _READ

    def _records(self, reference: ReferencePass) -> int:
        """How many layers this pass records."""
        n = 0
        if reference.attention_weight is not None:
            n += sum(reference.attention_weight > weight for _, weight in self.attention)
        if reference.adain_weight is not None:
            n += sum(reference.adain_weight > weight for _, weight in self.adain)
        return n

    def _recorded_one(self) -> None:
        self.to_record -= 1
        if self.to_record <= 0:
            raise _Recorded

    # the hooks
    def _attention_pre(self, index: int):
        weight = self.attention[index][1]

        def hook(module, args, kwargs):
            if self.plain or self.mode is None:
                return None
            x = args[0] if args else kwargs["x" if "x" in kwargs else "hidden_states"]
            if self.mode == _WRITE:
                if self.writing.attention_weight is not None and self.writing.attention_weight > weight:
                    self.attention_bank.setdefault(index, []).append((x.detach(), self.writing.fidelity))
                    self._recorded_one()
                return None
            entries = self.attention_bank.pop(index, None)
            if not entries:
                return None
            fidelity = sum(f for _, f in entries) / len(entries)
            self.reading[index] = (x, fidelity)
            kwargs = dict(kwargs)
            kwargs[self.context_kwarg] = torch.cat([x] + [t.to(x.dtype) for t, _ in entries], dim=1)
            return args, kwargs

        return hook

    def _attention_post(self, index: int):
        def hook(module, args, kwargs, output):
            read = self.reading.pop(index, None)
            if read is None or self.plain:
                return None
            x, fidelity = read
            uc = self.uc_rows
            if uc is None or fidelity <= FIDELITY_EPS:
                return None
            plain_kwargs = dict(kwargs)
            plain_kwargs[self.context_kwarg] = None
            self.plain = True
            try:
                plain = module(x[uc], *args[1:], **plain_kwargs)
            finally:
                self.plain = False
            output = output.clone()
            output[uc] = fidelity * plain + (1.0 - fidelity) * output[uc]
            return output

        return hook

    def _adain_hook(self, index: int):
        weight = self.adain[index][1]

        def hook(module, args, output):
            if self.plain or self.mode is None:
                return None
            tensor = output[0] if isinstance(output, tuple) else output
            if self.mode == _WRITE:
                if self.writing.adain_weight is not None and self.writing.adain_weight > weight:
                    mean, var = statistics(tensor.detach())
                    self.adain_bank.setdefault(index, []).append((mean, var, self.writing.fidelity))
                    self._recorded_one()
                return None
            entries = self.adain_bank.pop(index, None)
            if not entries:
                return None
            fidelity = sum(f for _, _, f in entries) / len(entries)
            new = read_adain(tensor, [(m, v) for m, v, _ in entries], fidelity, self.uc_rows)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook


class Removal:
    """A handle whose `remove()` takes a ReferenceHooks off (so hosts keep one list of handles)."""

    def __init__(self, hooks: ReferenceHooks):
        self.hooks = hooks

    def remove(self) -> None:
        self.hooks.remove()
