"""`python -m lib_controlnet demo --out DIR` (= `make demo`): the whole loop offline on a CPU, in minutes, with a
base that can draw, so the images show whether the trained ControlNet follows its condition.

1. the shapes base (`lib_controlnet.shapes_base`: a tiny SD1.5-shaped model the project trained to draw coloured
   shapes on plain backgrounds; its weights ship with the project) as a diffusers folder;
2. draw shapes and build a dataset from them with the real dataset builder (local-folder source, canny maps of
   the shapes' outlines, parquet shards): the fill50k task of the original ControlNet, in miniature;
3. train a ControlNet on it, scoring control fidelity on held-out rows every validation round;
4. export it as ldm safetensors into a models folder;
5. load it back through the model registry and generate the held-out conditions through the hook, with and
   without it;
6. write a report (condition | untrained | trained, the fidelity curve, the loss curve) whose links are relative,
   so the folder can move. The last two lines name the exported .safetensors and the report.

`--arch sdxl` runs the same loop on a tiny SDXL-shaped base (two text encoders, pooled embeddings, time ids) with
random weights: it proves the SDXL path end to end in seconds, but that base cannot draw, so its images and scores
say nothing about quality. `make demo` stays on the shapes base.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

DEMO_NAME = "demo-shapes"
HELD_OUT = 8
ARCHS = ("sd15", "sdxl")


def register(subparsers) -> None:
    demo = subparsers.add_parser("demo", help="offline demo: shapes base -> dataset -> train -> export -> load -> "
                                              "generate -> report")
    demo.add_argument("--out", default="demo-output", help="folder for everything the demo writes "
                      "(default demo-output)")
    demo.add_argument("--images", type=int, default=800, help="shape images to build the dataset from (default 800)")
    demo.add_argument("--steps", type=int, default=2000, help="ControlNet training steps (default 2000)")
    demo.add_argument("--rounds", type=int, default=10, help="fidelity rounds during training (default 10)")
    demo.add_argument("--held-out", type=int, default=HELD_OUT, help=f"held-out rows for fidelity (default {HELD_OUT})")
    demo.add_argument("--size", type=int, default=64, help="image size, a multiple of 64 (default 64)")
    demo.add_argument("--sample-steps", type=int, default=10,
                      help="sampling steps of the validation, fidelity and comparison images (default 10)")
    demo.add_argument("--arch", choices=ARCHS, default="sd15",
                      help="base architecture: sd15, the shapes base that draws (default); sdxl, a tiny SDXL-shaped "
                           "base with random weights that proves the SDXL loop but cannot draw")
    demo.set_defaults(func=run_demo)


def _say(text: str) -> None:
    print(text, flush=True)


def prepare_base(out: Path, arch: str = "sd15") -> Path:
    if arch == "sdxl":
        from lib_controlnet.tiny_models import save_tiny_sdxl_diffusers_base

        base = save_tiny_sdxl_diffusers_base(out / "base")
        _say(f"[1/6] base: a tiny SDXL-shaped base with random weights -> {base}")
        return base
    from lib_controlnet.shapes_base import SHIPPED_WEIGHTS, save_diffusers_base

    base = save_diffusers_base(out / "base")
    _say(f"[1/6] base: the shapes base from {SHIPPED_WEIGHTS.name} -> {base}")
    return base


def build_dataset(out: Path, count: int, size: int) -> Path:
    from lib_controlnet.dataset.config import BuildConfig
    from lib_controlnet.dataset.job import run_build
    from lib_controlnet.shapes import write_images

    write_images(out / "source-images", count, size=size, seed=0)
    dataset = out / "dataset"
    config = BuildConfig(out_dir=str(dataset), image_dir=str(out / "source-images"), image_size=size,
                         resize_mode="center_crop", module="canny", encode_format="png", encode_quality=9, thread_count=4,
                         processes_count=1, preview_count=4)
    manifest = run_build(config)
    _say(f"[2/6] dataset: {dataset} ({_count_rows(manifest)} samples, canny maps of the outlines)")
    return dataset


def _count_rows(manifest: dict):
    counts = manifest.get("counts", {}) if isinstance(manifest, dict) else {}
    return counts.get("written", counts.get("samples", "?"))


def validation_pair(out: Path, dataset: Path, size: int) -> tuple[str, Path]:
    """The first held-out row's (prompt, condition file): the training's validation image each round."""
    from lib_controlnet.fidelity_eval import heldout_rows

    prompt, hint, _ = heldout_rows(str(dataset), 1, size)[0][0]
    path = out / "validation-condition.png"
    hint.save(path)
    return prompt, path


def train_model(out: Path, dataset: Path, base: Path, steps: int, size: int, rounds: int, held_out: int,
                name: str = DEMO_NAME, sample_steps: int = 10):
    from lib_controlnet.train.config import TrainConfig
    from lib_controlnet.train.trainer import TrainCallbacks, Trainer

    prompt, condition = validation_pair(out, dataset, size)
    config = TrainConfig(dataset=str(dataset), base=str(base), output_dir=str(out / "training"), resolution=size,
                         max_train_steps=steps, train_batch_size=8, learning_rate=1e-3,
                         lr_warmup_steps=min(10, steps // 10),  # a few-step run (the tests) must move at all
                         lr_scheduler="constant_with_warmup", checkpointing_steps=steps, cache_latents=True,
                         cache_text_embeddings=True, validation_steps=max(1, steps // max(1, rounds)),
                         validation_inference_steps=sample_steps, validation_prompts=[prompt],
                         validation_images=[str(condition)], fidelity_samples=held_out, export_dir=str(out / "models"),
                         export_name=name, export_dtype="fp16")
    last = [0.0]

    def on_progress(p) -> None:
        if p.metrics.get("fidelity") is not None and p.step:
            _say(f"      step {p.step}/{p.total_steps} fidelity {p.metrics['fidelity']:.3f} "
                 f"(untrained {p.metrics.get('fidelity_untrained', float('nan')):.3f})")
        if p.step == p.total_steps or time.monotonic() - last[0] > 10:
            last[0] = time.monotonic()
            _say(f"      step {p.step}/{p.total_steps} loss {p.loss:.4f} ETA {p.eta_s:.0f}s")

    result = Trainer(config, TrainCallbacks(on_progress=on_progress, on_message=lambda m: None)).run()
    history = result.fidelity
    _say(f"[3/6] trained {result.steps} steps in {result.train_seconds:.0f}s: loss {result.losses[0]:.4f} -> "
         f"{sum(result.losses[-10:]) / len(result.losses[-10:]):.4f} (mean of last 10)")
    if history is not None and history.untrained is not None:
        _say(f"      fidelity ({history.score}, {history.samples} held-out rows): untrained {history.untrained:.3f} "
             f"-> trained {history.latest:.3f}; rounds took {history.seconds:.0f}s "
             f"({100 * history.seconds / max(result.train_seconds, 1e-9):.0f}% of training)")
    if result.validation:
        folder = Path(result.report).parent / "validation"
        _say(f"      validation images: {len(result.validation)} rounds under {folder}")
    _say(f"[4/6] exported: {result.exported}")
    return config, result


def load_and_generate(out: Path, config, result, held_out: int, sample_steps: int = 10) -> dict:
    """Held-out conditions through the registry-loaded ControlNet and through the base alone (what the
    untrained ControlNet draws: its zero convolutions add nothing), same prompts and seeds."""
    from lib_controlnet.base_model import load_pipeline
    from lib_controlnet.fidelity_eval import heldout_rows
    from lib_controlnet.generate import GenerateRequest, generate
    from lib_controlnet.models import get_controlnet, get_registry
    from lib_controlnet.settings import get_settings, update_settings
    from lib_controlnet.shapes import shape_iou
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
    folder = out / "generated"
    folder.mkdir(parents=True, exist_ok=True)
    rows, side = heldout_rows(config.dataset, held_out, config.resolution)
    pipe = load_pipeline(config.base)
    columns = {"condition": [], "untrained": [], "trained": []}
    ious = {"untrained": [], "trained": []}
    for number, (prompt, hint, _) in enumerate(rows):
        hint_path = folder / f"condition-{number:02d}.png"
        hint.save(hint_path)
        columns["condition"].append(hint_path)
        for kind in ("untrained", "trained"):
            units = [ControlUnit(model=name, module="none", image=hint_path)] if kind == "trained" else []
            request = GenerateRequest(base=config.base, prompt=prompt, units=units, steps=sample_steps, width=side,
                                      height=side,
                                      seed=number, guidance_scale=3.0)
            image = generate(request, pipe).images[0]
            path = folder / f"{kind}-{number:02d}.png"
            image.save(path)
            columns[kind].append(path)
            ious[kind].append(shape_iou(hint, image))
    mean = {kind: sum(v) / len(v) for kind, v in ious.items()}
    _say(f"[5/6] registry: {name}; generated {len(rows)} held-out conditions with and without it: shape IoU "
         f"{mean['untrained']:.3f} -> {mean['trained']:.3f}")
    return dict(name=name, columns=columns, iou=mean, prompts=[p for p, _, _ in rows])


def comparison_strip(columns: dict, path: Path, cell: int = 96) -> Path:
    """One row per kind (condition, untrained, trained), one column per held-out row."""
    from PIL import Image, ImageDraw

    label = 72
    kinds = list(columns)
    count = len(columns[kinds[0]])
    strip = Image.new("RGB", (label + count * cell, len(kinds) * cell), "white")
    draw = ImageDraw.Draw(strip)
    for row, kind in enumerate(kinds):
        draw.text((4, row * cell + cell // 2 - 6), kind, fill="black")
        for column, image in enumerate(columns[kind]):
            strip.paste(Image.open(image).convert("RGB").resize((cell, cell), Image.NEAREST),
                        (label + column * cell, row * cell))
    strip.save(path)
    return path


def steepest(history) -> list[str]:
    """Where the curve gained most: one interval holding most of the gain is the paper's "sudden convergence"."""
    rounds = history.rounds
    gain = rounds[-1][1] - rounds[0][1] if len(rounds) > 2 else 0
    if gain <= 0:
        return []
    (a, before), (b, after) = max(zip(rounds, rounds[1:]), key=lambda pair: pair[1][1] - pair[0][1])
    return [f"- Largest gain between two rounds: steps {a} -> {b} ({before:.3f} -> {after:.3f}), "
            f"{100 * (after - before) / gain:.0f}% of the whole gain over {len(rounds) - 1} intervals"]


BASE_LINES = {
    "sd15": "A tiny base trained to draw coloured shapes",
    "sdxl": "A tiny SDXL-shaped base with random weights (it cannot draw: this run proves the SDXL loop, not quality)",
}


def write_demo_report(out: Path, result, generated: dict, seconds: float, arch: str = "sd15") -> Path:
    strip = comparison_strip(generated["columns"], out / "generated" / "condition_untrained_trained.png")
    training = Path(result.report).parent

    def rel(path) -> str:  # links relative to the report, so the folder can move
        return Path(path).resolve().relative_to(out.resolve()).as_posix()

    history = result.fidelity
    lines = [
        "# ControlNet Studio demo", "",
        f"{BASE_LINES[arch]} -> dataset builder (canny maps of the outlines) -> ControlNet "
        "training with control fidelity on held-out rows -> ldm export -> registry -> generation through the hook.",
        "", f"Finished in {seconds:.0f} s.", "",
        f"- Dataset: [{rel(out / 'dataset')}]({rel(out / 'dataset')})",
        f"- Exported ControlNet: [{rel(result.exported)}]({rel(result.exported)}) "
        f"(registry name `{generated['name']}`)",
        f"- Training report: [{rel(result.report)}]({rel(result.report)})", "",
        "## Condition | untrained | trained", "",
        "Held-out conditions, the same prompt and seed per row. Untrained = the base alone, which is what a "
        "ControlNet draws before training (its zero convolutions add nothing).", "",
        f"![condition, untrained, trained]({rel(strip)})", "",
        "Shape IoU (region the outline encloses vs the generated shape): "
        f"untrained {generated['iou']['untrained']:.3f}, "
        f"trained {generated['iou']['trained']:.3f}.", "",
    ]
    if history is not None and history.rounds:
        from lib_controlnet.train.report import fidelity_lines

        lines += ["## Control fidelity", "", *fidelity_lines(history, result.train_seconds), *steepest(history), "",
                  f"![fidelity curve]({rel(training / 'fidelity_curve.png')})", ""]
    lines += ["## Loss", "", f"![loss curve]({rel(training / 'loss_curve.png')})", "",
              "## Prompts of the rows", "", *[f"{i}. {p}" for i, p in enumerate(generated["prompts"])], ""]
    report = out / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    summary = dict(seconds=round(seconds, 1), shape_iou=generated["iou"], train_seconds=round(result.train_seconds, 1),
                   fidelity=history.to_dict() if history is not None else None, exported=rel(result.exported))
    (out / "demo.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return report


def run_demo(args) -> int:
    started = time.monotonic()
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = prepare_base(out, args.arch)
    dataset = build_dataset(out, args.images, args.size)
    name = DEMO_NAME if args.arch == "sd15" else f"{DEMO_NAME}-{args.arch}"
    config, result = train_model(out, dataset, base, args.steps, args.size, args.rounds, args.held_out, name,
                                 args.sample_steps)
    generated = load_and_generate(out, config, result, args.held_out, args.sample_steps)
    seconds = time.monotonic() - started
    report = write_demo_report(out, result, generated, seconds, args.arch)
    _say(f"[6/6] demo finished in {seconds:.0f}s")
    _say(f"exported: {result.exported}")
    _say(f"report: {report}")
    return 0
