"""The only part of the extension that imports the WebUI's `modules`: the script lifecycle, callbacks,
settings, infotext and API route registration. `scripts/controlnet.py` hands every call to this package."""
