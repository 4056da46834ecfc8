"""Gradio builders (the ControlNet panel, the Dataset and Train tabs) and the plain helpers they share with
the HTTP API and the WebUI layer. No host imports here: the same builders serve the WebUI and the standalone
app."""
