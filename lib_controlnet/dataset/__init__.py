"""Dataset builder: sources -> download -> caption -> condition -> write, as a resumable job.

Public entry points: `BuildConfig` (config.py), `run_build(config, progress=None, cancel=None)` (job.py),
`dataset_info(dir)` (info.py). The output format is described in writer.py.
"""
