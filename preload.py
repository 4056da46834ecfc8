"""WebUI command-line flags for ControlNet Studio (read by the WebUI before anything else loads).

The other WebUI ControlNet extension defines --controlnet-dir, --controlnet-annotator-models-path and
--controlnet-preprocessor-cache-size with the same meaning; argparse refuses a second definition, and the
WebUI's preload of whichever extension comes second would die on it. So a flag that is already defined, or that
another installed extension's preload.py will define, is left to that one: both read the same value.
"""
import argparse
import os

_HERE = os.path.dirname(os.path.abspath(__file__))

FLAGS = [
    ("--controlnet-dir", dict(type=str, default=None, help="Extra folder to scan (recursively) for ControlNet models")),
    ("--controlnet-annotator-models-path", dict(type=str, default=None,
                                                help="Folder holding preprocessor (annotator) weights")),
    ("--controlnet-no-half", dict(action="store_true", default=False,
                                  help="Keep ControlNet weights in fp32 even when the UNet runs in half precision")),
    ("--controlnet-preprocessor-cache-size", dict(type=int, default=None,
                                                  help="How many preprocessor results to keep in memory")),
]


def _defined_by_other_extensions(extensions_dir: str) -> str:
    texts = []
    for name in sorted(os.listdir(extensions_dir)) if os.path.isdir(extensions_dir) else []:
        path = os.path.join(extensions_dir, name, "preload.py")
        if name != os.path.basename(_HERE) and os.path.isfile(path):
            try:
                with open(path, encoding="utf-8", errors="replace") as handle:
                    texts.append(handle.read())
            except OSError:
                continue
    return "\n".join(texts)


def preload(parser, extensions_dir: str = os.path.dirname(_HERE)):
    others = _defined_by_other_extensions(extensions_dir)
    for flag, options in FLAGS:
        if f'"{flag}"' in others or f"'{flag}'" in others:
            continue
        try:
            parser.add_argument(flag, **options)
        except argparse.ArgumentError:  # an extension that came first defined it already
            continue
