"""The training report: loss curve PNG, control-fidelity curve PNG, validation grid PNG, and report.md /
report.html naming every file."""
from __future__ import annotations

import html
import json
from pathlib import Path

from PIL import Image, ImageDraw

from lib_controlnet.train.config import TrainConfig


def loss_curve_png(losses: list[float], path: Path, title: str = "training loss") -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.2), dpi=100)
    axes = figure.add_subplot(1, 1, 1)
    steps = list(range(1, len(losses) + 1))
    axes.plot(steps, losses, linewidth=0.8, alpha=0.5, label="loss per step")
    if len(losses) >= 5:
        window = max(2, len(losses) // 20)
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                  for i in range(len(losses))]
        axes.plot(steps, smooth, linewidth=1.6, label=f"mean of last {window}")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if losses:
        axes.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(str(path))
    return path


def fidelity_curve_png(history, path: Path) -> Path:
    """Fidelity on the held-out rows per validation round, the untrained (step-0) ControlNet's as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.2), dpi=100)
    axes = figure.add_subplot(1, 1, 1)
    steps = [step for step, _ in history.rounds]
    values = [value for _, value in history.rounds]
    axes.plot(steps, values, marker="o", linewidth=1.6, label=f"{history.score} on {history.samples} held-out rows")
    if history.untrained is not None:
        axes.axhline(history.untrained, linestyle="--", color="gray", linewidth=1, label="untrained (step 0)")
    axes.set_xlabel("step")
    axes.set_ylabel(history.score)
    axes.set_ylim(0, max(1.0, max(values, default=0) * 1.05))
    axes.set_title(f"control fidelity ({history.module})")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(str(path))
    return path


def fidelity_lines(history, train_seconds: float = 0.0) -> list[str]:
    """The report's sentences on fidelity: the score's definition, untrained -> latest, the rounds' cost."""
    if history is None or not history.rounds:
        return []
    untrained, latest = history.untrained, history.latest
    lines = [f"- Score: **{history.score}** through `{history.module}` on {history.samples} held-out rows: "
             f"{history.definition}"]
    if untrained is not None:
        ratio = f" ({latest / untrained:.1f}x)" if untrained > 0 else ""
        lines.append(f"- Untrained (step 0): {untrained:.4f}; "
                     f"latest (step {history.rounds[-1][0]}): {latest:.4f}{ratio}")
    else:
        lines.append(f"- Latest (step {history.rounds[-1][0]}): {latest:.4f}")
    if train_seconds > 0:
        lines.append(f"- Fidelity rounds took {history.seconds:.1f} s of the {train_seconds:.1f} s of training "
                     f"({100 * history.seconds / train_seconds:.1f}%)")
    lines.append("- Rounds: " + ", ".join(f"step {step}: {value:.4f}" for step, value in history.rounds))
    return lines


def validation_grid(validation: list, hints: list[Image.Image], path: Path, cell: int = 128) -> Path | None:
    """Rows: validation steps (the first row shows the conditioning images); columns: the user's pairs."""
    rows = [(f"step {step}", [image for _, image, _ in images]) for step, images in validation if images]
    if not rows:
        return None
    if hints:
        rows.insert(0, ("hint", hints))
    columns = max(len(images) for _, images in rows)
    label = 70
    grid = Image.new("RGB", (label + columns * cell, len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for row, (name, images) in enumerate(rows):
        draw.text((4, row * cell + cell // 2 - 6), name, fill="black")
        for column, image in enumerate(images):
            grid.paste(image.convert("RGB").resize((cell, cell)), (label + column * cell, row * cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def write_report(output_dir, config: TrainConfig, result, hints: list[Image.Image] | None = None) -> Path:
    output_dir = Path(output_dir)
    curve = loss_curve_png(result.losses, output_dir / "loss_curve.png")
    if hints is None:
        from lib_controlnet.train.validation import hint_preview

        try:
            from lib_controlnet.train.data import load_hint_file

            size = (config.resolution, config.resolution)
            hints = [hint_preview(load_hint_file(p, size)) for _, p in config.validation_pairs()]
        except Exception:  # a validation image removed since: the grid just has no hint row
            hints = []
    grid = validation_grid(result.validation, hints, output_dir / "validation_grid.png")
    history = getattr(result, "fidelity", None)
    fidelity_curve = fidelity_curve_png(history, output_dir / "fidelity_curve.png") if history and history.rounds \
        else None
    if history is not None:
        (output_dir / "fidelity.json").write_text(json.dumps(history.to_dict(), indent=2), encoding="utf-8")
    (output_dir / "losses.json").write_text(json.dumps(result.losses), encoding="utf-8")
    status = "cancelled" if result.cancelled else "finished"
    first = f"{result.losses[0]:.5f}" if result.losses else "-"
    last = f"{sum(result.losses[-10:]) / len(result.losses[-10:]):.5f}" if result.losses else "-"
    files = [("Exported ControlNet", result.exported), ("Diffusers folder", result.exported_diffusers),
             ("Last checkpoint", result.checkpoint), ("Loss curve", curve), ("Fidelity curve", fidelity_curve),
             ("Validation grid", grid),
             ("Config", output_dir / "train_config.json")]
    lines = [
        "# ControlNet training report", "",
        f"- Status: {status} after {result.steps} of {result.total_steps} steps",
        f"- Dataset: `{config.dataset}`", f"- Base model: `{config.base}`",
        f"- Loss: first step {first}, mean of the last 10 steps {last}", "",
        "## Files", "",
    ]
    lines += [f"- {name}: `{path}`" for name, path in files if path]
    lines += ["", "## Loss curve", "", f"![loss curve]({curve.name})", ""]
    fidelity_text = fidelity_lines(history, getattr(result, "train_seconds", 0.0))
    if fidelity_text:
        lines += ["## Control fidelity", "", *fidelity_text, ""]
        if fidelity_curve:
            lines += [f"![fidelity curve]({fidelity_curve.name})", ""]
    if grid:
        lines += ["## Validation", "", f"![validation grid]({grid.name})", ""]
    lines += ["## Settings", "", "```json", json.dumps(config.to_dict(), indent=2), "```", ""]
    report = output_dir / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    items = "".join(f"<li>{html.escape(name)}: <code>{html.escape(str(path))}</code></li>"
                    for name, path in files if path)
    grid_html = f'<h2>Validation</h2><img src="{grid.name}">' if grid else ""
    if fidelity_text:
        items_html = "".join(f"<li>{html.escape(line[2:])}</li>" for line in fidelity_text)
        curve_html = f'<img src="{fidelity_curve.name}">' if fidelity_curve else ""
        grid_html = f"<h2>Control fidelity</h2><ul>{items_html}</ul>{curve_html}" + grid_html
    (output_dir / "report.html").write_text(
        "<!doctype html><meta charset=utf-8><title>ControlNet training report</title>"
        f"<h1>ControlNet training report</h1><p>{status} after {result.steps} of {result.total_steps} steps; "
        f"loss {first} &rarr; {last}</p><ul>{items}</ul><h2>Loss curve</h2><img src=\"{curve.name}\">{grid_html}"
        f"<h2>Settings</h2><pre>{html.escape(json.dumps(config.to_dict(), indent=2))}</pre>", encoding="utf-8")
    return report
