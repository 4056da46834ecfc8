"""bench_hook.py --control-lora: what a Control-LoRA costs before its first step, against the peer, loading the
same ControlNet as a full file (what a user of a full ControlNet pays instead). Per step a Control-LoRA is a plain
ControlNet (bench_hook's other figures hold for it).

The file is written in Stability's layout at rank 128 (every encoder conv/linear as up/down factors, biases and
norms in full, the ControlNet's own layers) for the benchmark's SDXL UNet, with random weights.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

RANK = 128


def _write(unet, controlnet, folder: Path) -> tuple[Path, Path]:
    from safetensors.torch import save_file

    from lib_controlnet.models import diffusers_to_ldm, save_controlnet_ldm, unet_diffusers_to_ldm

    generator = torch.Generator().manual_seed(0)
    tensors = {"lora_controlnet": torch.tensor([])}
    for key, tensor in unet_diffusers_to_ldm(unet.state_dict()).items():
        if not key.startswith(("time_embed.", "label_emb.", "input_blocks.", "middle_block.")):
            continue
        if key.endswith(".weight") and tensor.ndim >= 2:
            rank = min(RANK, tensor.shape[0])
            tail = (1, 1) if tensor.ndim == 4 else ()
            tensors[key[:-7] + ".up"] = torch.randn(tensor.shape[0], rank, *tail, generator=generator) * 0.01
            tensors[key[:-7] + ".down"] = torch.randn(rank, *tensor.shape[1:], generator=generator) * 0.01
        else:
            tensors[key] = tensor.clone()
    tensors.update({k: v for k, v in diffusers_to_ldm(controlnet.state_dict()).items()
                    if k.startswith(("input_hint_block.", "zero_convs.", "middle_block_out."))})
    lora = folder / "control-lora-bench-rank128.safetensors"
    save_file(tensors, str(lora))
    full = save_controlnet_ldm(controlnet, folder / "controlnet-bench-full.safetensors", dtype="fp32")
    return lora, Path(full)


def run(args, components, controlnet) -> None:
    from lib_controlnet.models import load_control_model, load_controlnet
    from lib_controlnet.models.kinds.control_lora import CONTROL_LORA, MERGED

    unet = components["unet"]
    times = {"merge": [], "cached": [], "full": []}
    with tempfile.TemporaryDirectory() as folder:
        lora, full = _write(unet, controlnet, Path(folder))
        sizes = lora.stat().st_size / 2**20, full.stat().st_size / 2**20
        for _ in range(args.repeats):
            MERGED.clear()
            start = time.perf_counter()
            weights = load_control_model(lora)
            CONTROL_LORA.for_base(weights, unet)
            times["merge"].append(time.perf_counter() - start)
            start = time.perf_counter()
            CONTROL_LORA.for_base(load_control_model(lora), unet)  # a later job: fingerprint + cache hit
            times["cached"].append(time.perf_counter() - start)
            start = time.perf_counter()
            load_controlnet(full)
            times["full"].append(time.perf_counter() - start)
    MERGED.clear()
    t = {name: statistics.median(values) for name, values in times.items()}
    print(f"Control-LoRA file {sizes[0]:.0f} MiB (rank {RANK}) vs the full ControlNet file {sizes[1]:.0f} MiB")
    print(f"first job: read + merge {t['merge']:.2f}s; later jobs (same base and file) {t['cached']:.3f}s; "
          f"peer, loading the full ControlNet file {t['full']:.2f}s")
    print(f"control-lora ratio       {t['merge'] / t['full']:.2f}  (first job's merge / a full file's load)")
