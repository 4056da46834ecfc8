"""Load a full-size SD1.5 ControlNet (fp16 safetensors, random weights, the released ldm key set):
this project vs diffusers, same run, same files, each load in its own fresh process.

    .venv/bin/python benchmarks/bench_load.py [--quick] [--repeats N] [--keep DIR]

Peers (diffusers 0.31, offline, fp16 kept):
  single-file  ControlNetModel.from_single_file(<same ldm file>, config=<shipped sd15 config dir>) -- same input
  folder       ControlNetModel.from_pretrained(<diffusers folder of the same weights>) -- diffusers' fastest path
               (low_cpu_mem_usage, no key conversion); the ratio is taken against the faster peer.
Measured in each child: seconds for the load call, seconds for load + reading every weight once (safetensors
maps files lazily, so "loaded" alone can hide reads), and peak RSS above the RSS after imports (MiB).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import os, sys, time, json
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, {root!r})
import lib_controlnet  # torchvision repair before diffusers
import torch
from diffusers import ControlNetModel
from lib_controlnet.models import load_controlnet
from lib_controlnet.models.configs import config_dir

def status_mib(field):
    # VmHWM belongs to this process image; ru_maxrss would carry over the parent's peak across exec.
    with open("/proc/self/status") as f:
        line = next(l for l in f if l.startswith(field + ":"))
    return int(line.split()[1]) / 1024

torch.set_num_threads(1)
mode, ldm_file, folder = sys.argv[1:4]
base_rss = status_mib("VmRSS")
start = time.perf_counter()
if mode == "ours":
    model = load_controlnet(ldm_file)
elif mode == "single-file":
    model = ControlNetModel.from_single_file(ldm_file, config=str(config_dir("sd15")), torch_dtype=torch.float16)
elif mode == "folder":
    model = ControlNetModel.from_pretrained(folder, torch_dtype=torch.float16)
loaded = time.perf_counter() - start
total = 0.0
with torch.no_grad():
    for p in model.parameters():
        total += float(p.float().sum())
touched = time.perf_counter() - start
peak = status_mib("VmHWM")
n = sum(p.numel() for p in model.parameters())
dtype = str(next(model.parameters()).dtype)
print(json.dumps(dict(load_s=loaded, load_touch_s=touched, peak_over_base_mib=peak - base_rss, params=n,
                      dtype=dtype, checksum=total)))
"""


def run_child(mode: str, ldm_file: Path, folder: Path) -> dict:
    code = CHILD.format(root=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code, mode, str(ldm_file), str(folder)], capture_output=True,
                         text=True, env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore"))
    if out.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="one repeat per loader")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="folder for the generated files (reused if present)")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats

    sys.path.insert(0, str(ROOT))
    import lib_controlnet  # noqa: F401
    from lib_controlnet.models.synthetic import write_random_controlnet

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_load_"))
    ldm_file, folder = work / "control_sd15_random_fp16.safetensors", work / "control_sd15_random_fp16_diffusers"
    if not ldm_file.exists():
        write_random_controlnet(ldm_file, "sd15", "fp16", "ldm")
    if not (folder / "config.json").exists():
        write_random_controlnet(folder, "sd15", "fp16", "diffusers")
    print(f"file: {ldm_file} ({ldm_file.stat().st_size / 2**20:.0f} MiB)")

    modes = ("ours", "single-file", "folder")
    results = {m: [] for m in modes}
    for _ in range(repeats):
        for mode in modes:  # interleaved, so machine load drifts hit every loader alike
            results[mode].append(run_child(mode, ldm_file, folder))
    checksums = {m: round(r[0]["checksum"], 1) for m, r in results.items()}
    if len(set(checksums.values())) != 1:
        raise SystemExit(f"loaders disagree on the weights: {checksums}")

    def med(mode, field):
        return statistics.median(r[field] for r in results[mode])

    print(f"{'loader':<12} {'load s':>8} {'load+read s':>12} {'peak MiB':>9}")
    for mode in modes:
        print(f"{mode:<12} {med(mode, 'load_s'):8.2f} {med(mode, 'load_touch_s'):12.2f} "
              f"{med(mode, 'peak_over_base_mib'):9.0f}")
    peer = min(("single-file", "folder"), key=lambda m: med(m, "load_touch_s"))
    print(f"peer = {peer} (the faster diffusers path); median of {repeats} run(s)")
    print(f"time ratio (load)        ours/peer = {med('ours', 'load_s') / med(peer, 'load_s'):.3f}   [target <= 1.0]")
    print(f"time ratio (load+read)   ours/peer = {med('ours', 'load_touch_s') / med(peer, 'load_touch_s'):.3f}"
          "   [target <= 1.0]")
    print(f"memory ratio (peak RSS)  ours/peer = "
          f"{med('ours', 'peak_over_base_mib') / med(peer, 'peak_over_base_mib'):.3f}   [target <= 1.0]")
    for other in ("single-file", "folder"):
        if other != peer:
            print(f"(vs {other}: load+read {med('ours', 'load_touch_s') / med(other, 'load_touch_s'):.3f}, "
                  f"memory {med('ours', 'peak_over_base_mib') / med(other, 'peak_over_base_mib'):.3f})")


if __name__ == "__main__":
    main()
