"""The standalone app in a real browser: Playwright driving Debian's chromium against `python -m lib_controlnet
serve` on 127.0.0.1. Screenshots go to test-artifacts/ (gitignored)."""
from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from webui_standin.standalone_server import MODEL_STEM, make_assets, running_server

CHROMIUM = shutil.which("chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium)"),
    pytest.mark.timeout(600),
]
UNIT = "#txt2img_controlnet_unit0"


@pytest.fixture(scope="module")
def photo_file(tmp_path_factory) -> Path:
    from skimage import data

    path = tmp_path_factory.mktemp("photo") / "astronaut.png"
    Image.fromarray(np.ascontiguousarray(data.astronaut()[::4, ::4])).save(path)  # 128x128
    return path


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    folder = tmp_path_factory.mktemp("browser-server")
    ARTIFACTS.mkdir(exist_ok=True)
    with running_server(folder, make_assets(folder), unit_count=2) as server, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.set_default_timeout(60_000)
            page.goto(server.url + "/")
            page.wait_for_selector(f"{UNIT}_image")
            yield page
        finally:
            browser.close()


def _set_slider(page, elem_id: str, value: int) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")
    box.blur()


def _image_from_src(src: str) -> np.ndarray:
    assert src.startswith("data:image"), src[:60]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))


def test_upload_pick_canny_preview_shows_the_map(page, photo_file):
    from lib_controlnet import preprocess

    page.set_input_files(f"{UNIT}_image input[type=file]", str(photo_file))
    page.wait_for_selector(f"{UNIT}_image canvas, {UNIT}_image img")
    page.locator(f"{UNIT}_send_dimensions").click()  # the 128x128 photo's size goes to width and height
    page.wait_for_function("document.querySelector('#txt2img_width input[type=number]').value === '128'")
    assert page.locator("#txt2img_height input[type=number]").input_value() == "128"
    page.locator(f"{UNIT}_control_type label", has_text="Canny").first.click()
    # choosing the control type picks its default preprocessor and model, and shows the module's sliders
    page.wait_for_function(f"document.querySelector('{UNIT}_model input')?.value.startsWith('{MODEL_STEM}')")
    assert page.locator(f"{UNIT}_module input").input_value() == "canny"
    page.wait_for_selector(f"{UNIT}_threshold_a:visible")
    assert "Low Threshold" in page.locator(f"{UNIT}_threshold_a").inner_text()
    _set_slider(page, "txt2img_controlnet_unit0_processor_res", 128)
    page.locator(f"{UNIT}_preview_button").click()
    preview = page.wait_for_selector(f"{UNIT}_preview img")
    page.screenshot(path=str(ARTIFACTS / "browser-preview-canny.png"), full_page=True)
    detected = _image_from_src(preview.get_attribute("src"))
    photo = np.asarray(Image.open(photo_file).convert("RGB"))
    np.testing.assert_array_equal(detected, preprocess.run("canny", photo, resolution=128))


def test_enable_and_generate_shows_image_and_map(page):
    page.locator(f"{UNIT}_enabled input").check()
    page.wait_for_function(
        "[...document.querySelectorAll('.cnet-unit-tabs button')].some(b => b.textContent.includes('[on]'))")
    for name, value in (("txt2img_width", 64), ("txt2img_height", 64), ("txt2img_steps", 2)):
        _set_slider(page, name, value)
    page.locator("#txt2img_prompt textarea").fill("an astronaut")
    page.locator("#txt2img_generate").click()
    page.wait_for_function("document.querySelectorAll('#txt2img_gallery img').length >= 2", timeout=180_000)
    page.wait_for_function("document.querySelector('#txt2img_info textarea').value.includes('ControlNet 0')")
    page.screenshot(path=str(ARTIFACTS / "browser-generate.png"), full_page=True)
    info = page.locator("#txt2img_info textarea").input_value()
    assert 'Module: canny' in info and MODEL_STEM in info and "Size: 64x64" in info


def test_bad_input_shows_an_error_and_the_page_keeps_working(page):
    page.locator(f"{UNIT}_model input").fill("")  # a model the registry does not know
    page.locator(f"{UNIT}_model input").type("no_such_model")
    page.keyboard.press("Enter")
    page.locator("#txt2img_generate").click()
    toast = page.wait_for_selector(".toast-body.error", timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "browser-error.png"), full_page=True)
    assert "ControlNet unit 0" in toast.inner_text()
    assert page.locator("#txt2img_generate").is_enabled()


def test_dataset_and_train_tabs_are_mounted(page):
    for title in ("Dataset", "Train"):
        page.locator("#tabs button", has_text=title).first.click()
        panel = page.locator(f"#tab_{title.lower()}")
        panel.wait_for(state="visible")
        page.screenshot(path=str(ARTIFACTS / f"browser-tab-{title.lower()}.png"), full_page=True)
        assert "not available in this build" not in panel.inner_text()
        assert panel.locator("button, input, textarea").count() > 0
    page.locator("#tabs button", has_text="txt2img").first.click()
