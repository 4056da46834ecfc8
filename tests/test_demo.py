"""`make demo` end to end at a small size: dataset builder -> training -> export -> registry -> generation -> report."""
from pathlib import Path

from lib_controlnet.cli import main


def test_demo_runs_the_whole_loop(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--images", "8", "--steps", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    exported = Path(lines[-2].split("exported: ", 1)[1])
    report = Path(lines[-1].split("report: ", 1)[1])
    assert exported.suffix == ".safetensors" and exported.is_file()
    assert report.is_file() and str(exported) in report.read_text()
    assert len(list((out / "generated").glob("generated-*.png"))) == 3
