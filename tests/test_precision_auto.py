"""annotator_precision "auto": bfloat16 with AMX, measured on CPUs with avx512_bf16, float32 elsewhere; decided
and logged once per process, the measurement kept per machine."""
import json

import torch

from annotators import runtime
from lib_controlnet.settings import get_settings, update_settings


def test_the_rule():
    calls = []

    def measured(gain):
        return lambda: calls.append(gain) or gain

    assert runtime.choose_auto_precision(True, True, measured(0.5)).dtype == torch.bfloat16  # AMX: no probe
    assert runtime.choose_auto_precision(False, False, measured(9.0)).dtype is None  # emulated: no probe
    assert calls == []
    fast = runtime.choose_auto_precision(False, True, measured(1.9))
    assert fast.dtype == torch.bfloat16 and "measured 1.9x faster" in fast.reason
    slow = runtime.choose_auto_precision(False, True, measured(1.05))
    assert slow.dtype is None and "only 1.05x" in slow.reason
    assert calls == [1.9, 1.05]


def test_the_probe_measures_this_cpu():
    """On one thread, in CPU time: a real ratio, positive and finite (about 1.9 on an avx512_bf16 EPYC, under
    load or not)."""
    gain = runtime._time_precisions(seconds=0.05, most=10)
    assert 0.05 < gain < 50


def test_decided_and_logged_once_per_process_and_measured_once_per_machine(tmp_path, monkeypatch, capfd):
    """Two "processes" (the per-process decision forgotten in between) on one machine: one log line each, the
    probe run once, the second reading the first one's measurement from the cache folder."""
    probes = []
    real_probe = runtime._time_precisions
    monkeypatch.setattr(runtime, "_time_precisions", lambda: probes.append(1) or real_probe(seconds=0.1))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    saved = get_settings().annotator_precision
    update_settings(annotator_precision="auto")
    logs = []
    try:
        for _process in range(2):
            runtime.auto_precision.cache_clear()
            first, second = runtime.low_precision_dtype(), runtime.low_precision_dtype()
            assert first == second
            logs.append([line for line in capfd.readouterr().err.splitlines() if "precision auto ->" in line])
    finally:
        runtime.auto_precision.cache_clear()
        update_settings(annotator_precision=saved)
    assert [len(lines) for lines in logs] == [1, 1] and logs[0] == logs[1]
    cache = tmp_path / "controlnet-studio" / "bfloat16_gain.json"
    if not runtime.bfloat16_matrix_units() and runtime.bfloat16_instructions():  # this CPU is measured
        gains = list(json.loads(cache.read_text()).values())
        assert probes == [1] and len(gains) == 1
        assert (first == torch.bfloat16) == (gains[0] >= runtime.MEASURED_GAIN)
        assert f"measured {gains[0]:.1f}x" in logs[0][0] or f"only {gains[0]:.2f}x" in logs[0][0]
    else:
        assert probes == [] and not cache.exists()
        assert first == (torch.bfloat16 if runtime.bfloat16_matrix_units() else None)
