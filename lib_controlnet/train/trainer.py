"""The training loop, host-agnostic: a TrainConfig in, checkpoints, validation images, an exported ControlNet
and a report out. Hugging Face Accelerate handles devices, mixed precision and several processes, so
`accelerate launch -m lib_controlnet train ...` runs this same loop on many GPUs or machines.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from lib_controlnet.errors import UserError
from lib_controlnet.train import checkpoint as ckpt
from lib_controlnet.train.base import BaseModel, load_base
from lib_controlnet.train.cache import TrainCache
from lib_controlnet.train.config import ConfigError, TrainConfig
from lib_controlnet.train.data import BatchPlan, TrainDataset, make_loader, open_records
from lib_controlnet.train.step import TrainingStep
from lib_controlnet.train.validation import FidelityHistory, FidelityValidator, HeldOut, Validator

log = logging.getLogger("lib_controlnet.train")

UNET_DECODER_PREFIXES = ("up_blocks.", "conv_norm_out.", "conv_out.")


@dataclasses.dataclass
class Progress:
    step: int
    total_steps: int
    loss: float
    lr: float
    epoch: int
    elapsed_s: float
    eta_s: float
    message: str = ""
    # Other named scalars measured at this step (a validation score, ...). The Train tab plots each name as its
    # own series beside the loss; a Progress sent again for the same step adds its metrics to that step.
    metrics: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class TrainCallbacks:
    on_progress: Optional[Callable[[Progress], None]] = None
    on_validation: Optional[Callable[[int, list], None]] = None  # (step, [(prompt, PIL image, path)])
    on_message: Optional[Callable[[str], None]] = None


@dataclasses.dataclass
class TrainResult:
    steps: int
    total_steps: int
    losses: list
    cancelled: bool
    output_dir: Path
    checkpoint: Optional[Path] = None
    exported: Optional[Path] = None
    exported_diffusers: Optional[Path] = None
    report: Optional[Path] = None
    validation: list = dataclasses.field(default_factory=list)  # [(step, [(prompt, image, path)])]
    fidelity: Optional[FidelityHistory] = None  # control fidelity rounds on the held-out rows
    train_seconds: float = 0.0  # wall time of the training loop, fidelity rounds included


class Trainer:
    def __init__(self, config: TrainConfig, callbacks: TrainCallbacks | None = None,
                 cancel_event: threading.Event | None = None, base: BaseModel | None = None,
                 export: bool = True):
        config.validate()
        self.config = config
        self.callbacks = callbacks or TrainCallbacks()
        self.cancel_event = cancel_event or threading.Event()
        self.base = base
        self.export_at_end = export
        self.output_dir = Path(config.output_dir).expanduser()

    # ------------------------------------------------------------------ set-up
    def _message(self, text: str) -> None:
        log.info(text)
        if self.callbacks.on_message and self.accelerator.is_main_process:
            self.callbacks.on_message(text)

    def _accelerator(self):
        from accelerate import Accelerator

        precision = self.config.mixed_precision
        if precision == "fp16" and not torch.cuda.is_available():
            precision = "no"  # fp16 autocast needs a GPU; keep full precision rather than fail
        if precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            precision = "no"
        self.precision = precision
        from accelerate.state import AcceleratorState

        state = AcceleratorState._shared_state
        if state and state.get("_mixed_precision") not in (None, precision):
            # accelerate keeps one state per process and refuses another precision: a second run in the same
            # process (the Train tab, the app) with a new precision would fail; the process group itself stays
            AcceleratorState._reset_state()
        return Accelerator(mixed_precision=precision,
                           gradient_accumulation_steps=self.config.gradient_accumulation_steps)

    def _optimizer(self, params):
        config = self.config
        optimizer_class = torch.optim.AdamW
        if config.use_8bit_adam:
            try:
                import bitsandbytes

                optimizer_class = bitsandbytes.optim.AdamW8bit
            except ImportError:
                self._message("bitsandbytes is not installed: using the standard AdamW optimizer.")
        return optimizer_class(params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                               weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)

    def _controlnet(self, base):
        from lib_controlnet.train.controlnet_size import controlnet_from_unet, misfit

        if self.config.controlnet:
            from lib_controlnet.models import load_controlnet

            path = Path(self.config.controlnet).expanduser()
            if not path.exists():
                raise ConfigError(f"ControlNet to fine-tune {self.config.controlnet} does not exist.")
            model = load_controlnet(path, dtype=torch.float32)
            problem = misfit(model, base.unet)
            if problem:
                from lib_controlnet.base_model import ARCHITECTURES

                label = ARCHITECTURES[base.family].label
                raise ConfigError(f"ControlNet to fine-tune {path.name} was made for another base model than this "
                                  f"{label} base ({problem}); pick one made for it, or leave controlnet empty.")
        else:
            model = controlnet_from_unet(base.unet, self.config.controlnet_size)
        model.requires_grad_(True)
        return model

    # ------------------------------------------------------------------ run
    def run(self) -> TrainResult:
        config = self.config
        self.accelerator = accelerator = self._accelerator()
        from accelerate.utils import set_seed
        from diffusers.optimization import get_scheduler

        set_seed(config.seed)
        device = accelerator.device
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision, torch.float32)
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temp(self.output_dir)
            config.save(self.output_dir / "train_config.json")

        records = open_records(config, cache_dir=self.output_dir / ".datasets-cache")
        heldout = self._held_out(records)
        if heldout is not None:
            records = heldout.train
        plan = BatchPlan.build(records, config, accelerator.num_processes)
        dataset = TrainDataset(records, config)
        steps_per_epoch = plan.batches_per_epoch() // config.gradient_accumulation_steps
        if steps_per_epoch == 0:
            raise ConfigError("One epoch holds fewer batches than gradient_accumulation_steps; lower it.")
        total_steps = config.max_train_steps or steps_per_epoch * config.num_train_epochs
        batches_per_step = config.gradient_accumulation_steps

        if config.vae and not Path(config.vae).expanduser().is_file():  # before the base's long load
            raise ConfigError(f"VAE file {config.vae} does not exist.")
        self._message(f"Loading base model {config.base}")
        base = self.base or load_base(config.base, config.base_config, config.prediction_type)
        if config.vae:
            from lib_controlnet.vae_file import load_vae_file

            base.vae = load_vae_file(config.vae, base.vae)
        base.vae.to(device, vae_dtype(base.vae, weight_dtype))
        if config.vae:
            self._message(f"VAE from {Path(config.vae).name}, taken as fp16-safe: it runs in "
                          f"{str(base.vae.dtype).replace('torch.', '')}")
        base.text_encoders_to(device, weight_dtype)
        base.unet.to(device, weight_dtype if config.sd_locked else torch.float32)
        controlnet = self._controlnet(base)
        params = list(controlnet.parameters())
        if not config.sd_locked:  # lllyasviel's sd_locked=False: the UNet decoder trains too
            for name, param in base.unet.named_parameters():
                if name.startswith(UNET_DECODER_PREFIXES):
                    param.requires_grad_(True)
                    params.append(param)
        if config.gradient_checkpointing:
            controlnet.enable_gradient_checkpointing()
            base.unet.enable_gradient_checkpointing()
        controlnet.train()
        optimizer = self._optimizer(params)
        lr_scheduler = get_scheduler(config.lr_scheduler, optimizer=optimizer, num_warmup_steps=config.lr_warmup_steps,
                                     num_training_steps=total_steps)
        if config.sd_locked:
            controlnet, optimizer = accelerator.prepare(controlnet, optimizer)
            unet = base.unet
        else:
            controlnet, unet, optimizer = accelerator.prepare(controlnet, base.unet, optimizer)
        raw_controlnet = accelerator.unwrap_model(controlnet)
        noise_generator = torch.Generator().manual_seed(config.seed * 7919 + accelerator.process_index)

        # ---- resume
        global_step, epoch, cursor, losses = 0, 0, 0, []
        resume = ckpt.resolve_resume(self.output_dir, config.resume_from)
        if resume is not None:
            state = ckpt.read_state(resume)
            if state.get("num_processes", 1) != accelerator.num_processes:
                raise ckpt.CheckpointError(f"Checkpoint {resume} was trained with {state.get('num_processes')} "
                                           f"process(es); resume it with the same number.")
            raw_controlnet.load_state_dict(ckpt.load_controlnet(resume).state_dict())
            unet_parts = ckpt.load_trained_unet_parts(resume)
            if unet_parts:
                accelerator.unwrap_model(unet).load_state_dict(unet_parts, strict=False)
            ckpt.load_training_state(resume, optimizer, lr_scheduler, accelerator.scaler,
                                     accelerator.process_index, noise_generator)
            global_step, epoch, cursor, losses = state["global_step"], state["epoch"], state["cursor"], state["losses"]
            self._message(f"Resumed from {resume} at step {global_step}")

        cache = TrainCache()
        if config.cache_latents or config.cache_text_embeddings:
            self._message("Caching latents / prompt embeddings")
            cache.build(dataset, plan, base, device, weight_dtype, config.cache_latents, config.cache_text_embeddings)
        validator = Validator(base, config, device, weight_dtype)
        fidelity = None
        if heldout is not None and accelerator.is_main_process:
            try:  # reads the held-out rows and runs the preprocessor once: a missing weight file shows here
                fidelity = FidelityValidator(base, config, device, weight_dtype, heldout.rows(), *self._fidelity_module)
            except Exception as error:  # fidelity is a measurement: without it, training still runs
                self._message(f"Control fidelity is off: {self._fidelity_module[0]} cannot run ({error}).")
        if config.cache_text_embeddings:
            base.text_encoders_to("cpu")  # every prompt they would encode is cached now
        step = TrainingStep(base, controlnet, unet, device, weight_dtype, noise_generator, cache, accelerator,
                            optimizer, params, config.max_grad_norm)

        run_state = dict(total=total_steps, start_time=time.monotonic(), start_step=global_step, records=records)
        result = TrainResult(global_step, total_steps, losses, False, self.output_dir)
        metrics = {}
        if fidelity is not None:
            if resume is not None and state.get("fidelity"):
                fidelity.history.rounds = state["fidelity"].get("rounds", [])
            if fidelity.history.untrained is None:  # the step-0 ControlNet: the baseline every round compares to
                if global_step == 0:
                    fidelity.run(raw_controlnet, 0)
                    self._message(f"Control fidelity of the untrained ControlNet ({fidelity.history.score}): "
                                  f"{fidelity.history.untrained:.4f}")
            if fidelity.history.untrained is not None:  # the first event carries the baseline alone
                metrics = {"fidelity_untrained": float(fidelity.history.untrained)}
            result.fidelity = self._fidelity_state = fidelity.history
        self._message(f"Training {total_steps} steps ({steps_per_epoch} per epoch) on {accelerator.num_processes} "
                      f"process(es), {self.precision} precision")
        done = global_step >= total_steps
        while not done:
            usable = steps_per_epoch * batches_per_step  # batches past the last whole step are dropped
            loader = make_loader(dataset, plan.local_batches(epoch, accelerator.process_index, cursor, usable),
                                 config.dataloader_num_workers)
            micro_losses = []
            for batch in loader:
                micro_losses.append(step.train_micro_batch(batch))
                cursor += 1
                if len(micro_losses) < batches_per_step:
                    continue
                lr_scheduler.step()
                global_step += 1
                step_loss = accelerator.reduce(torch.stack(micro_losses).mean(), reduction="mean").item()
                micro_losses = []
                losses.append(step_loss)
                at_end = global_step >= total_steps
                if fidelity is not None and (at_end or (config.validation_steps
                                                        and global_step % config.validation_steps == 0)):
                    fidelity.run(raw_controlnet, global_step)
                    metrics = self._fidelity_metrics(fidelity)
                self._report_progress(global_step, step_loss, lr_scheduler.get_last_lr()[0], epoch, run_state,
                                      metrics)
                metrics = {}
                cancelled = self.cancel_event.is_set()  # after the progress callback, which may have asked
                if at_end or cancelled or (config.checkpointing_steps and global_step % config.checkpointing_steps == 0):
                    result.checkpoint = self._save(accelerator, global_step, epoch, cursor, losses, raw_controlnet,
                                                   unet, optimizer, lr_scheduler, noise_generator)
                if validator.enabled and config.validation_steps and global_step % config.validation_steps == 0 \
                        and not at_end:
                    self._validate(validator, raw_controlnet, global_step, result)
                if at_end or cancelled:
                    result.cancelled = cancelled and not at_end
                    done = True
                    break
            else:
                epoch, cursor = epoch + 1, 0

        result.steps, result.losses = global_step, losses
        result.train_seconds = time.monotonic() - run_state["start_time"]
        if not result.cancelled:
            if validator.enabled:
                self._validate(validator, raw_controlnet, global_step, result)
            if self.export_at_end and accelerator.is_main_process:
                self._export(raw_controlnet, base, records, global_step, result)
        if accelerator.is_main_process:
            from lib_controlnet.train.report import write_report

            result.report = write_report(self.output_dir, config, result)
        accelerator.wait_for_everyone()
        self.trained_controlnet = raw_controlnet
        self.base = base
        return result

    # ------------------------------------------------------------------ pieces of the loop
    def _report_progress(self, global_step, loss, lr, epoch, run_state, metrics=None):
        elapsed = time.monotonic() - run_state["start_time"]
        done_here = global_step - run_state["start_step"]
        eta = elapsed / done_here * (run_state["total"] - global_step) if done_here else 0.0
        if self.callbacks.on_progress and self.accelerator.is_main_process:
            self.callbacks.on_progress(Progress(global_step, run_state["total"], loss, lr, epoch, elapsed, eta,
                                                metrics=dict(metrics or {})))

    def _held_out(self, records) -> HeldOut | None:
        """The rows fidelity is scored on, when the dataset says (or the config names) its preprocessor and is
        big enough to spare them (at most a quarter of it)."""
        from lib_controlnet.fidelity import module_of_dataset

        count = self.config.fidelity_samples
        self._fidelity_module = ("", None, None)
        if not count:
            return None
        module, threshold_a, threshold_b = module_of_dataset(self.config.dataset)
        if self.config.fidelity_module and self.config.fidelity_module != module:
            module, threshold_a, threshold_b = self.config.fidelity_module, None, None
        if not module or module == "none":
            self._message("Control fidelity is off: the dataset does not say which preprocessor made its "
                          "conditioning images (set fidelity_module).")
            return None
        if len(records) < 4 * count:
            self._message(f"Control fidelity is off: {len(records)} rows cannot spare {count} held-out rows "
                          "(lower fidelity_samples).")
            return None
        self._fidelity_module = (module, threshold_a, threshold_b)
        self._message(f"Holding out the last {count} rows of the dataset for control fidelity ({module})")
        return HeldOut(records, count)

    @staticmethod
    def _fidelity_metrics(fidelity) -> dict:
        """Scalars for the progress stream: the latest round's score and the untrained baseline."""
        metrics = {"fidelity": fidelity.history.latest}
        if fidelity.history.untrained is not None:
            metrics["fidelity_untrained"] = fidelity.history.untrained
        return {k: float(v) for k, v in metrics.items() if v is not None}

    def _save(self, accelerator, global_step, epoch, cursor, losses, raw_controlnet, unet, optimizer, lr_scheduler,
              noise_generator) -> Path | None:
        tmp = ckpt.temp_dir(self.output_dir, global_step)
        if accelerator.is_main_process:
            ckpt.begin(self.output_dir, global_step)
        accelerator.wait_for_everyone()
        ckpt.write_rng(tmp, accelerator.process_index, noise_generator)
        final = None
        if accelerator.is_main_process:
            unet_parts = None
            if not self.config.sd_locked:
                unet_parts = {k: v for k, v in accelerator.unwrap_model(unet).state_dict().items()
                              if k.startswith(UNET_DECODER_PREFIXES)}
            state = dict(global_step=global_step, epoch=epoch, cursor=cursor, losses=losses,
                         num_processes=accelerator.num_processes, config=self.config.to_dict())
            if getattr(self, "_fidelity_state", None) is not None:
                state["fidelity"] = self._fidelity_state.to_dict()
            ckpt.write_main(tmp, raw_controlnet, unet_parts, optimizer, lr_scheduler, accelerator.scaler, state)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            final = ckpt.commit(tmp, self.output_dir, global_step, self.config.checkpoints_total_limit)
            self._message(f"Saved checkpoint {final}")
        accelerator.wait_for_everyone()
        return final or (self.output_dir / f"{ckpt.PREFIX}{global_step}")

    def _validate(self, validator, raw_controlnet, global_step, result):
        if not self.accelerator.is_main_process:
            return
        images = validator.run(raw_controlnet, global_step, self.output_dir / "validation")
        result.validation.append((global_step, images))
        if self.callbacks.on_validation:
            self.callbacks.on_validation(global_step, images)

    def _export(self, raw_controlnet, base, records, global_step, result):
        from lib_controlnet.train.export import ExportRequest, export_controlnet

        request = ExportRequest.from_training(self.config, global_step, base.source, records.name)
        if result.fidelity is not None:  # how well it follows its condition, readable from the file alone
            import json

            request.metadata["fidelity"] = json.dumps(result.fidelity.to_dict())
        exported = export_controlnet(raw_controlnet, request)
        result.exported, result.exported_diffusers = exported.file, exported.diffusers_dir
        self._message(f"Exported {exported.file}")


def vae_dtype(vae, weight_dtype: torch.dtype) -> torch.dtype:
    """A VAE whose config says force_upcast (SDXL's stock VAE overflows in fp16) stays fp32; a VAE file the user
    gave (`vae`, taken as fp16-safe) runs in the training precision."""
    return torch.float32 if getattr(vae.config, "force_upcast", False) else weight_dtype


def train(config: TrainConfig, callbacks: TrainCallbacks | None = None,
          cancel_event: threading.Event | None = None) -> TrainResult:
    try:
        return Trainer(config, callbacks, cancel_event).run()
    except UserError:
        raise
    except torch.cuda.OutOfMemoryError:
        raise UserError("The GPU ran out of memory: lower train_batch_size or resolution, or turn on "
                        "gradient_checkpointing, mixed_precision or use_8bit_adam.") from None


__all__ = ["Progress", "TrainCallbacks", "TrainResult", "Trainer", "train"]
