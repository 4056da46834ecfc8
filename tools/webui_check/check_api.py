"""Against a running WebUI with the tiny SDXL checkpoint loaded (make_tiny_sdxl.py), through its HTTP API: an SDXL
canny unit changes the image, a repeat is bit-identical, the plain image after it is bit-identical to the plain image
before; an SD1.5 ControlNet on the SDXL base is refused with one sentence (HTTP 422) and changes nothing.

    python tools/webui_check/check_api.py "tinyxl_canny [hash]" "tiny15_canny [hash]" [http://127.0.0.1:7861]

Names as /controlnet/model_list gives them. Live previews are turned off first (the WebUI would fetch its
VAE-approx model from the network). Exits 1 when a check fails.
"""
import base64
import io
import json
import sys
import urllib.error
import urllib.request

import numpy as np
from PIL import Image, ImageDraw


def post(url, path, payload):
    request = urllib.request.Request(url + path, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def pixels(b64):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(np.int16)


def main(sdxl_model, sd15_model, url="http://127.0.0.1:7861"):
    post(url, "/sdapi/v1/options", {"live_previews_enable": False})
    cond = Image.new("RGB", (128, 128), "black")
    draw = ImageDraw.Draw(cond)
    draw.rectangle([20, 30, 100, 90], outline="white", width=6)
    draw.ellipse([40, 10, 90, 60], fill="white")
    buffer = io.BytesIO()
    cond.save(buffer, "PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    base = dict(prompt="a house", seed=7, steps=4, width=128, height=128, sampler_name="Euler", cfg_scale=5)

    def run(model=None):
        payload = dict(base)
        if model:
            unit = dict(enabled=True, image=image, module="canny", model=model, weight=1.0, processor_res=128,
                        threshold_a=100, threshold_b=200)
            payload["alwayson_scripts"] = {"ControlNet": {"args": [unit]}}
        return post(url, "/sdapi/v1/txt2img", payload)

    results = {}
    plain = [run()]
    controlled = [run(sdxl_model), run(sdxl_model)]
    plain.append(run())
    refused = run(sd15_model)
    plain.append(run())
    if any(status != 200 for status, _ in plain + controlled):
        print("a generation failed:", [body for status, body in plain + controlled if status != 200][:1])
        return 1
    first, again = (pixels(body["images"][0]) for _, body in controlled)
    before = pixels(plain[0][1]["images"][0])
    results["the SDXL canny unit changes the image"] = bool(np.abs(first - before).max() > 0)
    results["a repeat is bit-identical"] = bool((first == again).all())
    results["the detected map comes back after the image"] = len(controlled[0][1]["images"]) == 2
    results["plain images before and after are bit-identical"] = all(
        (pixels(body["images"][0]) == before).all() for _, body in plain[1:])
    results["an SD1.5 ControlNet on the SDXL base answers 422"] = refused[0] == 422
    print(f"mean |controlled - plain| = {float(np.abs(first - before).mean()):.3f}")
    print(f"refusal: {refused[0]} {refused[1].get('detail')}")
    for name, ok in results.items():
        print(("ok   " if ok else "FAIL ") + name)
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
