"""ControlNet training: config, data, frozen base, loop, checkpoints, export, report.

Public entry points: `TrainConfig` (config.py), `train(config, callbacks, cancel_event)` / `Trainer`
(trainer.py), `export_checkpoint(ckpt, out)` (export.py).
"""
