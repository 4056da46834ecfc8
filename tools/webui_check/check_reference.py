"""Against a running WebUI with the tiny SDXL checkpoint loaded (make_tiny_sdxl.py), through its HTTP API: the three
reference preprocessors are listed as the other extension lists them (model-free, control type "Reference" with
model "None" only), each changes the image with model "None", a repeat is bit-identical, the infotext names the unit,
and the plain image after them is bit-identical to the one before.

    python tools/webui_check/check_reference.py [http://127.0.0.1:7861]

On the tiny checkpoint the conditioning is weak (another prompt moves a UNet call by about 4% of its output), so
the images differ by a grey level or so; the check is that they differ, repeat exactly, and leave nothing behind.
Exits 1 when a check fails.
"""
import base64
import io
import json
import sys
import urllib.request

import numpy as np
from PIL import Image

from check_api import pixels, post

MODULES = ("reference_only", "reference_adain", "reference_adain+attn")


def get(url, path):
    with urllib.request.urlopen(url + path, timeout=60) as response:
        return json.loads(response.read())


def main(url="http://127.0.0.1:7861"):
    post(url, "/sdapi/v1/options", {"live_previews_enable": False})
    results = {}
    detail = get(url, "/controlnet/module_list?alias_names=true")["module_detail"]
    results["the reference preprocessors are model-free"] = all(detail[m]["model_free"] for m in MODULES)
    reference = get(url, "/controlnet/control_types")["control_types"]["Reference"]
    results["control type Reference lists them with model None"] = (
        reference["module_list"] == ["none", *MODULES] and reference["model_list"] == ["None"])
    photo = (np.random.RandomState(0).rand(128, 128, 3) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, "PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    base = dict(prompt="a house", seed=7, steps=4, width=128, height=128, sampler_name="Euler", cfg_scale=5)

    def run(module=None):
        payload = dict(base)
        if module:
            unit = dict(enabled=True, image=image, module=module, model="None", weight=1.0, threshold_a=0.5)
            payload["alwayson_scripts"] = {"ControlNet": {"args": [unit]}}
        status, body = post(url, "/sdapi/v1/txt2img", payload)
        if status != 200:
            raise SystemExit(f"a generation failed ({status}): {body.get('detail', body)}")
        return body

    before = pixels(run()["images"][0])
    for module in MODULES:
        first, again = run(module), run(module)
        image_1 = pixels(first["images"][0])
        results[f"{module} changes the image"] = bool(np.abs(image_1 - before).max() > 0)
        results[f"{module} repeats bit-identically"] = bool((image_1 == pixels(again["images"][0])).all())
        results[f"{module} is in the infotext"] = (
            f'Module: {module}, Model: None' in json.loads(first["info"])["infotexts"][0])
        print(f"{module}: mean |image - plain| = {float(np.abs(image_1 - before).mean()):.3f}")
    results["the plain image afterwards is bit-identical"] = bool((pixels(run()["images"][0]) == before).all())
    for name, ok in results.items():
        print(("ok   " if ok else "FAIL ") + name)
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
