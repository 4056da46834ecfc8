"""How a training metric reaches the Train tab's plot: the trainer's Progress (its loss and any named
`metrics`) -> BackgroundTraining.series -> train_tab.metrics_frame, one row per (step, value, metric)."""
from lib_controlnet.train.runner import BackgroundTraining
from lib_controlnet.train.trainer import Progress
from lib_controlnet.ui.train_tab import metrics_frame


def _progress(step: int, loss: float, **metrics) -> Progress:
    return Progress(step, 10, loss, 1e-5, 0, 1.0, 9.0, metrics=metrics)


def test_every_reported_metric_becomes_a_series_of_the_plot():
    runner = BackgroundTraining()
    assert metrics_frame(runner.series) is None  # nothing reported yet: an empty plot
    runner._on_progress(_progress(1, 0.5))
    runner._on_progress(_progress(2, 0.4))
    runner._on_progress(_progress(2, 0.4, fidelity=0.25))  # a validation round's score, sent for its step again
    runner._on_progress(_progress(3, 0.3))
    frame = metrics_frame(runner.series)
    assert runner.losses == [0.5, 0.4, 0.3]  # the repeated step adds its metric, not a second loss
    rows = sorted(map(tuple, frame[["metric", "step", "value"]].itertuples(index=False)))
    assert rows == [("fidelity", 2, 0.25), ("loss", 1, 0.5), ("loss", 2, 0.4), ("loss", 3, 0.3)]
