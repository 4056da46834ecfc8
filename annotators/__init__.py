"""Preprocessor implementations, one module per family.

Each annotator is a function `(image: HxWx3 uint8 RGB, params: Params) -> HxW or HxWx3 uint8` that works on an
image already resized to the preprocessor resolution (see lib_controlnet.preprocess, which owns resizing,
caching and the registry). Neural annotators wrap controlnet-aux's networks, loaded from the weight files of
the public lllyasviel/Annotators release (see annotators.weights).
"""
