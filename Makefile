# `make test` builds .venv (the WebUI 1.10.1 stack plus ours, CPU torch pinned) if missing, then runs every test.
# `make demo` runs the whole loop offline: dataset -> train -> export -> load -> generate.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PIN := -c requirements/constraints.txt
export GRADIO_ANALYTICS_ENABLED := False
export NO_ALBUMENTATIONS_UPDATE := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DISABLE_TELEMETRY := 1

.PHONY: test demo venv bench bench-gpu browser-deps clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements/test.txt requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24" wheel
	$(PIP) install $(PIN) -r requirements/test.txt
	# The WebUI's own ldm package and the CLIP BPE file; both hard-pin an old stack, so no deps.
	$(PIP) install $(PIN) --no-deps stable-diffusion-sdkit==2.1.5 open_clip_torch==2.20.0
	# mediapipe_face: the newest mediapipe with a face mesh that runs beside protobuf 3.20.0; no deps, since it
	# declares opencv-contrib-python (a second cv2/) and sounddevice (audio only). matplotlib comes with gradio.
	$(PIP) install $(PIN) --no-deps mediapipe==0.10.9 absl-py
	touch $@

browser-deps:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium missing: browser tests will be skipped"; }

test: venv browser-deps
	@$(PY) -m pytest -q -p no:cacheprovider tests; status=$$?; \
	if [ $$status = 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$status

demo: venv
	$(PY) -m lib_controlnet demo --out demo-output

bench: venv
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

# The GPU suite needs a CUDA torch, which the CPU-pinned .venv does not hold: it runs on GPU_PY (a Python with CUDA
# torch and this project's requirements; benchmarks/RESULTS.md says how on a bare GPU machine). Under 8 minutes.
GPU_PY ?= python3
bench-gpu:
	$(GPU_PY) benchmarks/gpu_suite.py --out gpu-suite-output

clean:
	rm -rf $(VENV) demo-output
