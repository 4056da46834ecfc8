"""WebUI 1.10 `modules.infotext_utils` (formerly generation_parameters_copypaste), reduced: parsing an
infotext into params (then the infotext_pasted callbacks) and filling components from params the way the
paste button does (a value converted to the type of the component's current value)."""
import json
import re

from modules import script_callbacks

# "Key: value" pairs; values with commas/colons come JSON-quoted.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def unquote(text):
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def parse_generation_parameters(x: str, skip_fields=None):
    res = {}
    *lines, lastline = x.strip().split("\n")
    if len(_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ''
    prompt = "\n".join(line for line in lines if not line.startswith("Negative prompt:"))
    res["Prompt"] = prompt
    for key, value in _PARAM.findall(lastline):
        res[key.strip()] = unquote(value.strip())
    script_callbacks.infotext_pasted_callback(x, res)
    return res


def paste_values(paste_fields, params):
    """What the paste button sends to each (component, key) pair: a new value or None (leave as is)."""
    out = []
    for output, key in paste_fields:
        v = key(params) if callable(key) else params.get(key, None)
        if v is None:
            out.append(None)
            continue
        valtype = type(output.value)
        try:
            if valtype == bool and v == "False":
                val = False
            elif valtype == int:
                val = float(v)
            else:
                val = valtype(v)
        except Exception:
            val = None
        out.append(val)
    return out
