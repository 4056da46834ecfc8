"""The standalone app in a real browser: Playwright driving Debian's chromium against `python -m lib_controlnet
serve` on 127.0.0.1. Screenshots go to test-artifacts/ (gitignored)."""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import TimeoutError as PlaywrightTimeout

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
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("browser-server")
    assets = make_assets(folder)
    with running_server(folder, assets, unit_count=2) as server:
        yield server, assets


@pytest.fixture(scope="module")
def page(served):
    from playwright.sync_api import sync_playwright

    server, _ = served
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
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
    # the 128x128 photo's size goes to width and height. On a loaded machine the sketch canvas can show before the
    # browser has handed the upload to the component, and a click then sends no image: click again, as a user would.
    for attempt in range(6):
        page.locator(f"{UNIT}_send_dimensions").click()
        try:
            page.wait_for_function("document.querySelector('#txt2img_width input[type=number]').value === '128'",
                                   timeout=10_000)
            break
        except PlaywrightTimeout:
            if attempt == 5:
                raise
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


# ---------------------------------------------------------------- Dataset and Train tabs: the jobs run in the page


def _open_tab(page, title: str):
    page.locator("#tabs button", has_text=title).first.click()
    panel = page.locator(f"#tab_{title.lower()}")
    panel.wait_for(state="visible")
    return panel


def _fill(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
    box.fill(str(value))
    box.blur()


def _text(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} textarea").input_value()


def _plot_pixels(page) -> str:
    """What the metrics plot shows now: its rendered canvas or svg."""
    return page.evaluate("""() => {
        const root = document.querySelector('#cntr_loss');
        const canvas = root && root.querySelector('canvas');
        if (canvas) return canvas.toDataURL();
        const svg = root && root.querySelector('svg');
        return svg ? svg.outerHTML : '';
    }""")


def _server_log(server) -> str:
    return server.log_path.read_text(errors="replace")


def test_train_tab_base_is_prefilled_with_serve_base(page, served):
    _, assets = served
    _open_tab(page, "Train")
    assert _text(page, "cntr_base") == str(assets["base"])


def test_dataset_build_from_a_local_folder_writes_the_dataset(page, tmp_path):
    import pyarrow.parquet as pq

    from lib_controlnet.train.synthetic import write_images

    write_images(tmp_path / "photos", 3, size=48, seed=5)
    out = tmp_path / "dataset"
    _open_tab(page, "Dataset")
    _fill(page, "cnds_out_dir", out)
    # the exact tab name: "Retrieval (... or local index)" contains "local" too
    page.locator("#controlnet_dataset button", has_text=re.compile(r"^\s*Local\s*$")).first.click()
    _fill(page, "cnds_image_dir", tmp_path / "photos")
    page.locator("#controlnet_dataset .label-wrap", has_text="Options").first.click()
    _fill(page, "cnds_image_size", 64)
    page.locator("#cnds_build").click()
    page.wait_for_function("/(done|stopped):/.test(document.querySelector('#cnds_status textarea').value)",
                           timeout=120_000)
    page.screenshot(path=str(ARTIFACTS / "browser-dataset-build.png"), full_page=True)
    status = _text(page, "cnds_status")
    assert "done: 3 samples written" in status, status
    table = pq.read_table(sorted((out / "data").glob("train-*.parquet")))
    assert table.num_rows == 3 and {"image", "conditioning_image", "text"} <= set(table.column_names)
    assert (out / "manifest.json").is_file() and (out / "README.md").is_file()
    page.wait_for_function("document.querySelectorAll('#cnds_gallery img').length >= 6")  # 3 (image, map) pairs


def test_dataset_build_from_a_local_clip_index_writes_the_dataset(page, tmp_path):
    """Issue 23's tab-driven build, offline: a folder of captioned images -> `dataset index build` (the CLI, as a
    user runs it before opening the tab) -> in the Dataset tab the retrieval source given the index folder and a
    prompt -> Build: query, read the files, canny maps, parquet dataset."""
    import pyarrow.parquet as pq
    from PIL import ImageDraw

    from lib_controlnet.cli import main  # `python -m lib_controlnet`'s entry point, in this process
    from tiny_clip import write_tiny_clip

    photos = tmp_path / "photos"
    photos.mkdir()
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
    captions = {}
    for i, (ground, square) in enumerate([(g, s) for g in colours for s in colours if g != s]):
        image = Image.new("RGB", (72, 64), colours[ground])
        ImageDraw.Draw(image).rectangle([12 + i, 12, 44 + i, 44], fill=colours[square])
        image.save(photos / f"{i:02d}.png")
        captions[f"{i:02d}.png"] = f"a {square} square on {ground}"
        (photos / f"{i:02d}.txt").write_text(captions[f"{i:02d}.png"], "utf-8")
    config, weights = write_tiny_clip(tmp_path / "model")
    index = tmp_path / "index"
    assert main([str(a) for a in ("dataset", "index", "build", "--out", index, "--image-dir", photos,
                                  "--clip-model", config, "--clip-weights", weights, "--max-index-memory", "100M",
                                  "--current-memory", "1G")]) == 0

    out = tmp_path / "dataset"
    _open_tab(page, "Dataset")
    _fill(page, "cnds_out_dir", out)
    page.locator("#controlnet_dataset button", has_text="Retrieval").first.click()
    _fill(page, "cnds_knn_url", index)
    _fill(page, "cnds_prompts", "a red square on blue")
    _fill(page, "cnds_num_images", 4)
    page.locator("#cnds_deduplicate input").uncheck()  # random CLIP weights: near-duplicate vectors
    page.locator("#controlnet_dataset button", has_text=re.compile(r"^\s*Local\s*$")).first.click()
    _fill(page, "cnds_image_dir", "")  # the page is shared: an earlier test may have left a folder here
    if not page.locator("#cnds_image_size").is_visible():
        page.locator("#controlnet_dataset .label-wrap", has_text="Options").first.click()
    _fill(page, "cnds_image_size", 64)
    page.locator("#cnds_module input").fill("canny")
    page.keyboard.press("Enter")
    before = _text(page, "cnds_status")  # the page is shared: an earlier build's "done:" may still show
    page.locator("#cnds_build").click()
    page.wait_for_function("""before => {
        const value = document.querySelector('#cnds_status textarea').value;
        return value !== before && /(done|stopped|error):/.test(value);
    }""", arg=before, timeout=120_000)
    page.screenshot(path=str(ARTIFACTS / "browser-dataset-index-build.png"), full_page=True)
    status = _text(page, "cnds_status")
    assert "done: 4 samples written" in status, status
    rows = pq.read_table(sorted((out / "data").glob("train-*.parquet"))).to_pylist()
    assert len(rows) == 4
    assert {r["source"] for r in rows} == {"local_index_file"}
    assert all(Path(r["url"]).parent == photos and r["text"] == captions[Path(r["url"]).name] for r in rows)
    assert all(r["image"]["bytes"] and r["conditioning_image"]["bytes"] for r in rows)
    maps = [np.asarray(Image.open(io.BytesIO(r["conditioning_image"]["bytes"]))) for r in rows]
    assert all(m.shape[:2] == (64, 64) and set(np.unique(m)) <= {0, 255} and m.max() == 255 for m in maps)  # canny
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["knn_url"] == str(index) and manifest["config"]["module"] == "canny"
    assert manifest["counts"]["written"] == 4
    page.wait_for_function("document.querySelectorAll('#cnds_gallery img').length >= 8")  # 4 (image, map) pairs


def _start_training(page, dataset: Path, output_dir: Path, export_dir: Path, steps: int, name: str,
                    resolution: int = 64, validate_every: int = 0) -> None:
    _open_tab(page, "Train")
    _fill(page, "cntr_dataset", dataset)
    _fill(page, "cntr_output_dir", output_dir)
    _fill(page, "cntr_resolution", resolution)
    _fill(page, "cntr_max_train_steps", steps)
    _fill(page, "cntr_train_batch_size", 1)
    accordion = page.locator("#controlnet_train .label-wrap", has_text="Checkpoints, validation, export").first
    if not page.locator("#cntr_export_dir").is_visible():
        accordion.click()
    _fill(page, "cntr_checkpointing_steps", 1000)
    _fill(page, "cntr_validation_steps", validate_every)
    _fill(page, "cntr_validation_prompts", "a square" if validate_every else "")
    _fill(page, "cntr_validation_images", dataset / "conditioning" / "0000.png" if validate_every else "")
    _fill(page, "cntr_export_dir", export_dir)
    _fill(page, "cntr_export_name", name)
    page.locator("#cntr_start").click()


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    from lib_controlnet.train.synthetic import write_folder_pair

    return write_folder_pair(tmp_path_factory.mktemp("pairs"), 4, size=64, seed=2)


def _step(status: str, pattern: str = r"step (\d+)/") -> int:
    import re

    found = re.search(pattern, status)
    return int(found.group(1)) if found else 0


def test_training_streams_progress_and_plot_and_cancel_leaves_a_checkpoint(page, served, pairs, tmp_path):
    from lib_controlnet.train import checkpoint as ckpt

    server, _ = served
    _start_training(page, pairs, tmp_path / "run", tmp_path / "models", 10_000, "cancelled", validate_every=6)
    empty_plot = _plot_pixels(page)
    page.wait_for_function("/step [2-9]\\d*\\/|error:/.test(document.querySelector('#cntr_status textarea').value)",
                           timeout=120_000)
    assert "error:" not in _text(page, "cntr_status"), _text(page, "cntr_status")
    first_status, first_plot = _text(page, "cntr_status"), _plot_pixels(page)
    first_bar = page.locator("#cntr_progress").last.inner_html()
    page.wait_for_function(f"(() => {{ const m = /step (\\d+)\\//.exec(document.querySelector('#cntr_status "
                           f"textarea').value); return m && +m[1] >= {_step(first_status) + 2}; }})()")
    later_status, later_plot = _text(page, "cntr_status"), _plot_pixels(page)
    page.screenshot(path=str(ARTIFACTS / "browser-train-running.png"), full_page=True)
    assert first_plot and first_plot != empty_plot and later_plot != first_plot  # the curve grows in the page
    assert _step(later_status) > _step(first_status) and "loss" in later_status
    assert "cnst-progress" in first_bar
    page.wait_for_function("document.querySelectorAll('#cntr_gallery img').length >= 1")  # validation images

    page.locator("#cntr_cancel").click()
    page.wait_for_function("document.querySelector('#cntr_status textarea').value.includes('cancelled after')",
                           timeout=120_000)
    status = _text(page, "cntr_status")
    stopped_at = _step(status, r"cancelled after (\d+) steps")
    assert stopped_at >= _step(later_status)
    latest = ckpt.resolve_resume(tmp_path / "run", "latest")  # what `--resume-from latest` would continue
    assert latest is not None and ckpt.read_state(latest)["global_step"] == stopped_at
    assert ckpt.load_controlnet(latest) is not None
    assert not list((tmp_path / "models").glob("*.safetensors"))  # a cancelled run exports nothing
    assert "Traceback" not in _server_log(server)


def test_training_runs_to_the_end_and_exports(page, served, pairs, tmp_path):
    from lib_controlnet.models import inspect_model

    server, assets = served
    _start_training(page, pairs, tmp_path / "run", assets["models"], 3, "control_ui_trained")
    page.wait_for_function("document.querySelector('#cntr_exported textarea').value.includes('.safetensors') || "
                           "document.querySelector('#cntr_status textarea').value.startsWith('error:')",
                           timeout=180_000)
    assert "error:" not in _text(page, "cntr_status"), _text(page, "cntr_status")
    exported = Path(_text(page, "cntr_exported").splitlines()[0])
    assert exported == assets["models"] / "control_ui_trained.safetensors" and exported.is_file()
    assert inspect_model(exported).base == "sd15"
    assert "finished after 3 steps" in _text(page, "cntr_status")
    assert "Traceback" not in _server_log(server)


def test_bad_training_settings_show_a_message_not_a_traceback(page, served, pairs, tmp_path):
    server, _ = served
    _start_training(page, pairs, tmp_path / "run", tmp_path / "models", 2, "bad", resolution=30)
    page.wait_for_function("document.querySelector('#cntr_status textarea').value.startsWith('error:')")
    assert "multiple of 8" in _text(page, "cntr_status")
    assert "Traceback" not in _server_log(server)


def _open_models(page, unit: str) -> list:
    """Opens the unit's Model dropdown; its options."""
    page.locator(f"{unit}_model input").click()
    page.locator(f"{unit}_model ul li").first.wait_for()
    return [text.replace("✓", "").strip() for text in page.locator(f"{unit}_model ul li").all_inner_texts()]


def test_refresh_lists_a_new_model_in_every_unit_and_under_its_type(page, served):
    from lib_controlnet import tiny_models
    from lib_controlnet.models import save_controlnet_ldm

    _, assets = served
    unit1 = "#txt2img_controlnet_unit1"
    added = assets["models"] / "mydata-250.safetensors"  # a name that tells no control type, as training exports
    shutil.copy(assets["models"] / f"{MODEL_STEM}.safetensors", added)
    _open_tab(page, "txt2img")
    page.locator("button", has_text="ControlNet Unit 0").first.click()
    page.locator(f"{UNIT}_refresh_models").click()
    page.wait_for_function(f"document.querySelector('{UNIT}_model input') !== null")
    page.wait_for_timeout(500)  # the refresh answers without the queue, at once
    page.locator("button", has_text="ControlNet Unit 1").first.click()
    page.locator(f"{unit1}_control_type label", has_text="Canny").first.click()
    page.wait_for_function(f"document.querySelector('{unit1}_module input')?.value === 'canny'")
    options = _open_models(page, unit1)
    new_name = next((o for o in options if o.startswith("mydata-250 [")), None)
    assert new_name, options  # refreshed in unit 0, listed in unit 1, and offered under Canny
    page.locator(f"{unit1}_model ul li", has_text="mydata-250").first.click()
    page.wait_for_function(f"document.querySelector('{unit1}_model input').value === '{new_name}'")
    save_controlnet_ldm(tiny_models.tiny_controlnet("sd15"), added, dtype="fp16")  # exported again: a new hash
    page.locator(f"{unit1}_refresh_models").click()
    page.wait_for_function(f"(() => {{ const v = document.querySelector('{unit1}_model input').value; "
                           f"return v.startsWith('mydata-250 [') && v !== '{new_name}'; }})()")


def test_user_error_in_the_panel_is_a_message_and_logs_no_traceback(page, served):
    server, _ = served
    _open_tab(page, "txt2img")
    page.locator("button", has_text="ControlNet Unit 1").first.click()
    page.locator("#txt2img_controlnet_unit1_preview_button").click()  # no control image uploaded in unit 1
    toast = page.wait_for_selector(".toast-body.error >> text=Upload a control image first")
    assert toast.is_visible()
    page.wait_for_timeout(500)  # the server writes its log line after answering
    log = _server_log(server)
    assert "Upload a control image first" in log and "Traceback" not in log, log[-3000:]
