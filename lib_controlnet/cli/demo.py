"""`python -m lib_controlnet demo --out DIR` (= `make demo`): the whole loop offline on a CPU, in minutes.

1. draw synthetic images (bright squares) and build a dataset from them with the real dataset builder
   (local-folder source, canny conditioning maps, parquet shards);
2. train a tiny ControlNet on a tiny random-weight base (`tiny_models`);
3. export it as ldm safetensors into a models folder;
4. load it back through the model registry and generate with it through the diffusers hook;
5. write a report (loss curve, validation grid, generated images, where every file is).
The last two lines name the exported .safetensors and the report.
"""
from __future__ import annotations

import time
from pathlib import Path

DEMO_NAME = "demo-squares"


def register(subparsers) -> None:
    demo = subparsers.add_parser("demo", help="offline demo: dataset -> train -> export -> load -> generate -> report")
    demo.add_argument("--out", default="demo-output", help="folder for everything the demo writes")
    demo.add_argument("--images", type=int, default=48, help="synthetic images to build the dataset from")
    demo.add_argument("--steps", type=int, default=120, help="training steps")
    demo.add_argument("--size", type=int, default=64, help="image size (multiple of 64)")
    demo.set_defaults(func=run_demo)


def _say(text: str) -> None:
    print(text, flush=True)


def build_dataset(out: Path, count: int, size: int) -> Path:
    from lib_controlnet.dataset.config import BuildConfig
    from lib_controlnet.dataset.job import run_build
    from lib_controlnet.train.synthetic import write_images

    write_images(out / "source-images", count, size=size, seed=0)
    dataset = out / "dataset"
    config = BuildConfig(out_dir=str(dataset), image_dir=str(out / "source-images"), image_size=size,
                         resize_mode="center_crop", module="canny", encode_format="png", encode_quality=9, thread_count=4,
                         processes_count=1, preview_count=4)
    manifest = run_build(config)
    _say(f"[1/5] dataset: {dataset} ({_count_rows(manifest)} samples, canny maps)")
    return dataset


def _count_rows(manifest: dict):
    counts = manifest.get("counts", {}) if isinstance(manifest, dict) else {}
    return counts.get("written", counts.get("samples", "?"))


def train_model(out: Path, dataset: Path, steps: int, size: int):
    from lib_controlnet.dataset.writer import preview_pairs
    from lib_controlnet.tiny_models import save_tiny_diffusers_base
    from lib_controlnet.train.config import TrainConfig
    from lib_controlnet.train.synthetic import CAPTION
    from lib_controlnet.train.trainer import TrainCallbacks, Trainer

    base = save_tiny_diffusers_base(out / "base")
    hints = [str(cond) for _, cond in preview_pairs(dataset)[:3]]
    config = TrainConfig(dataset=str(dataset), base=str(base), output_dir=str(out / "training"), resolution=size,
                         max_train_steps=steps, train_batch_size=4, learning_rate=1e-3, lr_warmup_steps=5,
                         lr_scheduler="constant_with_warmup", checkpointing_steps=max(1, steps // 2),
                         validation_prompts=[CAPTION], validation_images=hints,
                         validation_steps=max(1, steps // 2), validation_inference_steps=8,
                         export_dir=str(out / "models"), export_name=DEMO_NAME, export_dtype="fp16")
    last = [0.0]

    def on_progress(p) -> None:
        if p.step == p.total_steps or time.monotonic() - last[0] > 5:
            last[0] = time.monotonic()
            _say(f"      step {p.step}/{p.total_steps} loss {p.loss:.4f} ETA {p.eta_s:.0f}s")

    result = Trainer(config, TrainCallbacks(on_progress=on_progress)).run()
    _say(f"[2/5] trained {result.steps} steps: loss {result.losses[0]:.4f} -> "
         f"{sum(result.losses[-10:]) / len(result.losses[-10:]):.4f} (mean of last 10)")
    _say(f"[3/5] exported: {result.exported}")
    return config, result, hints


def load_and_generate(out: Path, config, result, hints: list[str]) -> list[Path]:
    from lib_controlnet.generate import GenerateRequest, generate
    from lib_controlnet.models import get_controlnet, get_registry
    from lib_controlnet.settings import get_settings, update_settings
    from lib_controlnet.train.synthetic import CAPTION
    from lib_controlnet.unit import ControlUnit

    models_dir = Path(result.exported).parent
    if models_dir not in [Path(p) for p in get_settings().model_dirs]:
        update_settings(model_dirs=[models_dir, *get_settings().model_dirs])
    registry = get_registry()
    registry.refresh()
    name = registry.name_of(result.exported)
    if name is None:
        raise RuntimeError(f"the exported file {result.exported} is not in the model registry")
    get_controlnet(name)  # loads through the registry and its cache
    _say(f"[4/5] registry: {name}")
    folder = out / "generated"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for number, hint in enumerate(hints):
        unit = ControlUnit(model=name, module="none", image=Path(hint))  # a Path: image strings are base64
        request = GenerateRequest(base=config.base, prompt=CAPTION, units=[unit], steps=10, width=config.resolution,
                                  height=config.resolution, seed=number, guidance_scale=3.0)
        image = generate(request).images[0]
        path = folder / f"generated-{number:02d}.png"
        image.save(path)
        written.append(path)
    _say(f"[5/5] generated {len(written)} images through the hook: {folder}")
    return written


def write_demo_report(out: Path, result, generated: list[Path], hints: list[str], name: str) -> Path:
    from PIL import Image

    strip = Image.new("RGB", (len(generated) * 128, 256), "white")
    for column, (hint, image) in enumerate(zip(hints, generated)):
        strip.paste(Image.open(hint).convert("RGB").resize((128, 128)), (column * 128, 0))
        strip.paste(Image.open(image).convert("RGB").resize((128, 128)), (column * 128, 128))
    strip_path = out / "generated" / "hints_and_outputs.png"
    strip.save(strip_path)
    training_report = Path(result.report)
    lines = [
        "# ControlNet Studio demo", "",
        "Synthetic squares -> dataset builder (canny maps) -> tiny ControlNet training -> ldm export -> "
        "registry -> generation through the hook.", "",
        f"- Dataset: `{out / 'dataset'}`",
        f"- Exported ControlNet: `{result.exported}` (registry name `{name}`)",
        f"- Training report: `{training_report}`",
        f"- Loss curve: `{training_report.parent / 'loss_curve.png'}`",
        f"- Validation grid: `{training_report.parent / 'validation_grid.png'}`",
        f"- Generated images: `{out / 'generated'}`", "",
        "## Loss curve", "", f"![loss]({training_report.parent / 'loss_curve.png'})", "",
        "## Validation grid", "", f"![validation]({training_report.parent / 'validation_grid.png'})", "",
        "## Generated (top: conditioning map, bottom: output)", "", f"![generated]({strip_path})", "",
    ]
    report = out / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    return report


def run_demo(args) -> int:
    started = time.monotonic()
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    dataset = build_dataset(out, args.images, args.size)
    config, result, hints = train_model(out, dataset, args.steps, args.size)
    generated = load_and_generate(out, config, result, hints)
    from lib_controlnet.models import get_registry

    name = get_registry().name_of(result.exported)
    report = write_demo_report(out, result, generated, hints, name)
    _say(f"demo finished in {time.monotonic() - started:.0f}s")
    _say(f"exported: {result.exported}")
    _say(f"report: {report}")
    return 0
