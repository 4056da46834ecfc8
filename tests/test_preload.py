"""WebUI flags: ours, and no clash with another extension that defines the same ones (the WebUI calls each
extension's preload in folder order on one argparse parser)."""
import argparse
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OTHER = '''def preload(parser):
    parser.add_argument("--controlnet-dir", type=str, default=None)
    parser.add_argument("--controlnet-preprocessor-cache-size", type=int, default=16)
'''


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"preload_{path.parent.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extensions(tmp_path, ours_name):
    ours = tmp_path / ours_name
    ours.mkdir()
    (ours / "preload.py").write_text((ROOT / "preload.py").read_text())
    other = tmp_path / "sd-webui-controlnet"
    other.mkdir()
    (other / "preload.py").write_text(OTHER)
    return _load(ours / "preload.py"), _load(other / "preload.py")


def test_our_flags_alone(tmp_path):
    parser = argparse.ArgumentParser()
    _load(ROOT / "preload.py").preload(parser, extensions_dir=str(tmp_path))
    opts = parser.parse_args(["--controlnet-dir", "/m", "--controlnet-no-half",
                              "--controlnet-preprocessor-cache-size", "4"])
    assert (opts.controlnet_dir, opts.controlnet_no_half, opts.controlnet_preprocessor_cache_size) == ("/m", True, 4)


def test_both_extensions_load_in_either_order(tmp_path):
    for ours_name in ("controlnet-studio", "zz-controlnet-studio"):  # before and after the other one
        folder = tmp_path / f"extensions-{ours_name}"
        folder.mkdir()
        ours, other = _extensions(folder, ours_name)
        parser = argparse.ArgumentParser()
        for module in sorted([ours, other], key=lambda m: Path(m.__file__).parent.name):
            module.preload(parser, **({"extensions_dir": str(folder)} if module is ours else {}))
        opts = parser.parse_args(["--controlnet-dir", "/m", "--controlnet-annotator-models-path", "/a"])
        assert opts.controlnet_dir == "/m" and opts.controlnet_annotator_models_path == "/a"
        assert opts.controlnet_preprocessor_cache_size == 16  # the other extension's definition
