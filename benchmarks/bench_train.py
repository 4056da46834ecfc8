"""Training step speed and memory: our trainer's step vs a reference step written plainly with diffusers the way
its `train_controlnet.py` does it (VAE encode, text encode, noise, ControlNet, UNet, MSE, backward, clip, AdamW
step, zero_grad), on the same model, batch, resolution and inputs.

Each variant runs in its own process (so peak memory is its own): `reference`, `ours` (no caching) and
`ours-cached` (VAE latents and text embeddings cached). Prints samples/s, the peak memory the steps add above
the loaded models (RSS sampled every 2 ms on CPU; max allocated on CUDA), and the ratios.

    python benchmarks/bench_train.py            # 128 px, batch 4, 2 rounds
    python benchmarks/bench_train.py --quick    # 64 px, 1 round
    python benchmarks/bench_train.py --sdxl     # tiny SDXL-shaped base; the reference is then written as
                                                # train_controlnet_sdxl.py does it (prompt embeddings, pooled
                                                # embeddings and add_time_ids precomputed, VAE per step)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from benchmarks import _train_steps as train_steps  # noqa: E402
from benchmarks._train_steps import PeakMemory, make_inputs, our_steps  # noqa: E402


def load_models(base_dir: Path, device):
    from diffusers import ControlNetModel

    from lib_controlnet.train.base import load_base

    base = load_base(base_dir)
    for part in (base.vae, *base.text_encoders, base.unet):
        part.to(device)
    controlnet = ControlNetModel.from_unet(base.unet).to(device)
    controlnet.train()
    return base, controlnet


# ---------------------------------------------------------------------------------------------- variants
def reference_steps(base, controlnet, batches, device):
    """What diffusers' train_controlnet.py (SD1.5) / train_controlnet_sdxl.py (SDXL) do per step, single process,
    fp32, their defaults."""
    import torch

    if not base.is_sdxl:
        return train_steps.reference_steps(base, controlnet, batches, device)
    parts = dict(unet=base.unet, noise_scheduler=base.noise_scheduler, vae=base.vae,
                 text_encoders=base.text_encoders, tokenizers=[base.tokenizer, base.tokenizer_2])
    step = train_steps.reference_sdxl_steps(parts, controlnet, batches, device, None, torch.float32)
    base.text_encoders_to("cpu")  # the script frees the encoders once the embeddings are computed
    return step


def worker(args) -> None:
    import torch

    import lib_controlnet  # noqa: F401  (torchvision repair)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    base, controlnet = load_models(Path(args.base), device)
    warmup = 2
    batches = make_inputs(args.resolution, args.batch, args.steps + warmup)
    if args.worker == "reference":
        step = reference_steps(base, controlnet, batches, device)
    else:
        step = our_steps(base, controlnet, batches, device, args.worker == "ours-cached", args.resolution)
    for batch in batches[:warmup]:
        step(batch)
    with PeakMemory(device) as memory:
        started = time.perf_counter()
        for batch in batches[warmup:]:
            loss = step(batch)
        float(loss)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
    print(json.dumps({"samples_per_s": args.steps * args.batch / elapsed, "added_mb": memory.added_mb,
                      "device": str(device)}))


# ---------------------------------------------------------------------------------------------- driver
def run_variant(name: str, args, base: Path) -> dict:
    command = [sys.executable, __file__, "--worker", name, "--base", str(base), "--resolution", str(args.resolution),
               "--batch", str(args.batch), "--steps", str(args.steps)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--worker", choices=("reference", "ours", "ours-cached"))
    parser.add_argument("--base")
    parser.add_argument("--sdxl", action="store_true", help="a tiny SDXL-shaped base (two text encoders)")
    args = parser.parse_args()
    args.resolution = args.resolution or (64 if args.quick else 128)
    args.steps = args.steps or (4 if args.quick else 6)
    rounds = args.rounds or (1 if args.quick else 2)
    if args.worker:
        worker(args)
        return

    import tempfile

    import lib_controlnet  # noqa: F401
    from lib_controlnet.tiny_models import save_tiny_diffusers_base, save_tiny_sdxl_diffusers_base

    with tempfile.TemporaryDirectory() as tmp:
        base = (save_tiny_sdxl_diffusers_base if args.sdxl else save_tiny_diffusers_base)(Path(tmp) / "base")
        results = {name: [] for name in ("reference", "ours", "ours-cached")}
        for _ in range(rounds):  # interleaved, so a busy moment hits every variant alike
            for name in results:
                results[name].append(run_variant(name, args, base))
    median = {name: {key: statistics.median(r[key] for r in runs) for key in ("samples_per_s", "added_mb")}
              for name, runs in results.items()}
    device = results["reference"][0]["device"]
    shape = "SDXL" if args.sdxl else "SD1.5"
    print(f"training step, tiny {shape}-shaped model, {args.resolution}px, batch {args.batch}, {args.steps} timed "
          f"steps, "
          f"{rounds} round(s), device {device}")
    for name, values in median.items():
        print(f"  {name:12s} {values['samples_per_s']:7.2f} samples/s   peak step memory {values['added_mb']:8.1f} MB")
    ref = median["reference"]
    speed = median["ours"]["samples_per_s"] / ref["samples_per_s"]
    memory = median["ours"]["added_mb"] / ref["added_mb"] if ref["added_mb"] > 0 else float("nan")
    cached_speed = median["ours-cached"]["samples_per_s"] / ref["samples_per_s"]
    print(f"speed ratio (ours / reference), no caching: {speed:.2f}x  (target >= 1.0x)")
    print(f"memory ratio (ours / reference), no caching: {memory:.2f}x  (target <= 1.0x)")
    print(f"speed ratio with cached latents + text embeddings: {cached_speed:.2f}x  (target >= 1.5x)")
    if args.sdxl:
        print("note: the SDXL reference precomputes its text embeddings as train_controlnet_sdxl.py does, so "
              "'ours, no caching' also encodes both prompts every step and the reference does not")


if __name__ == "__main__":
    main()
