"""`python -m lib_controlnet detect`: what a user types, what lands on disk, one-line errors with exit 2."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import skimage.data

from lib_controlnet.cli import main


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "coffee.jpg"
    cv2.imwrite(str(path), skimage.data.coffee()[:, :, ::-1])
    return path


def test_detect_writes_the_map(photo, tmp_path, capsys):
    out = tmp_path / "maps" / "canny.png"
    assert main(["detect", "--module", "canny", "--res", "256", "--threshold-a", "50", "--threshold-b", "120",
                 str(photo), str(out)]) == 0
    written = cv2.imread(str(out))
    assert written.shape == (256, 384, 3)
    assert set(np.unique(written)) == {0, 255}
    assert "canny: 384x256" in capsys.readouterr().out


def test_detect_by_alias_and_inpaint_mask(photo, tmp_path):
    mask = tmp_path / "mask.png"
    cv2.imwrite(str(mask), np.pad(np.full((100, 100), 255, np.uint8), ((150, 150), (250, 250))))
    out = tmp_path / "hint.png"
    assert main(["detect", "--module", "inpaint_global_harmonious", "--mask", str(mask), str(photo), str(out)]) == 0
    rgba = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
    assert rgba.shape == (400, 600, 4) and rgba[200, 300, 3] == 255 and rgba[0, 0, 3] == 0


@pytest.mark.parametrize("argv, message", [
    (["--module", "nope"], "Unknown preprocessor 'nope'"),
    (["--module", "canny", "--threshold-a", "999"], "Low Threshold (threshold_a) must be between 1 and 255"),
    # the registry's one range, as module_list and /controlnet/detect state it
    (["--module", "canny", "--res", "2049"], "resolution must be -1 (the default) or a whole number from 64 to 2048"),
    (["--module", "canny", "--res", "16"], "from 64 to 2048, got 16"),
    # the missing-weights sentence gives a CLI user the flag, not a settings page
    (["--module", "softedge_hed", "--annotator-dir", "{tmp}"],
     "needs the weight file ControlNetHED.pth: put it in {tmp} (it is published in lllyasviel/Annotators on "
     "Hugging Face), or run the command again with --allow-annotator-downloads."),
])
def test_detect_errors_are_one_line_exit_2(photo, tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    message = message.replace("{tmp}", str(tmp_path))
    from lib_controlnet.settings import get_settings, update_settings

    saved = get_settings().annotator_models_path
    try:
        assert main(["detect", *argv, str(photo), str(tmp_path / "o.png")]) == 2
    finally:
        update_settings(annotator_models_path=saved)
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_detect_rejects_non_images_and_missing_files(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert main(["detect", str(text), str(tmp_path / "o.png")]) == 2
    assert main(["detect", str(tmp_path / "missing.png"), str(tmp_path / "o.png")]) == 2
    assert main(["detect", str(tmp_path), str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "not an image" in err[0] and "No such input image" in err[1]
    assert err[2] == f"error: {tmp_path} is a folder; detect reads one image file (run it once per image)."


def test_detect_list_from_a_real_process():
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    done = subprocess.run([sys.executable, "-m", "lib_controlnet", "detect", "--list"], capture_output=True,
                          text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("none")
    canny = next(line for line in lines if line.startswith("canny"))
    assert "Resolution 64..2048 (default 512), Low Threshold 1..255 (default 100)" in canny and "model-free" in canny
    assert any(line.startswith("depth_midas (= depth)") and "needs weights" in line for line in lines)


def test_detect_precision_flag(photo, tmp_path):
    """--precision is applied: the bfloat16 map differs from the float32 one, by a few grey levels at most."""
    from annotators import random_weights, runtime
    from lib_controlnet.settings import get_settings, update_settings

    random_weights.write(tmp_path, ["sk_model.pth", "sk_model2.pth"])
    saved = get_settings().annotator_models_path, get_settings().annotator_precision
    maps = {}
    try:
        runtime.unload_all()
        for precision in ("float32", "bfloat16"):
            out = tmp_path / f"{precision}.png"
            assert main(["detect", "--module", "lineart_realistic", "--res", "128", "--precision", precision,
                         "--annotator-dir", str(tmp_path), str(photo), str(out)]) == 0
            assert get_settings().annotator_precision == precision
            maps[precision] = cv2.imread(str(out)).astype(int)
    finally:
        update_settings(annotator_models_path=saved[0], annotator_precision=saved[1])
        runtime.unload_all()
    diff = np.abs(maps["float32"] - maps["bfloat16"])
    assert maps["float32"].shape == (128, 192, 3) and 0 < diff.max() <= 8
    with pytest.raises(SystemExit):
        main(["detect", "--module", "canny", "--precision", "half", str(photo), str(tmp_path / "x.png")])
