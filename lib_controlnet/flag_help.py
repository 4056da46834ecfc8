"""`--help` lines from config dataclasses: each field's `metadata["help"]` plus its default, so a flag's
description is written once, beside the field it describes (TrainConfig, BuildConfig)."""
from __future__ import annotations

import dataclasses


def default_of(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def shown_default(value) -> str:
    """How a default reads on a command line: what to type, or what leaving the flag out means."""
    if value is None or value == "" or value == [] or value == {}:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        import json

        return json.dumps(value)
    return str(value)


def flag_help(field: dataclasses.Field) -> str:
    """One line: the field's description and its default. A field without a description is a bug the test
    of every --help finds; it reads as its bare name here rather than failing the whole CLI."""
    text = field.metadata.get("help") or field.name.replace("_", " ")
    # argparse %-formats help strings: a literal % must be doubled
    return f"{text} (default: {shown_default(default_of(field))})".replace("%", "%%")
