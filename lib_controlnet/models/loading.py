"""Reading weight files safely: safetensors, or pickles restricted to plain tensors (`weights_only=True`).

Two levels: `read_header` gives names, shapes and dtypes without reading the tensors (cheap for safetensors,
used by detection and the registry); `read_tensors` gives the tensors themselves.
"""
from __future__ import annotations

import dataclasses
import json
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Optional

import torch

from lib_controlnet.models.errors import ModelFileError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
# Names of the weights file inside a diffusers folder, in order of preference.
DIFFUSERS_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin",
)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NESTED_STATE_KEYS = ("state_dict", "model", "module", "params")


@dataclasses.dataclass
class Header:
    """What a weights file holds, without the tensors."""
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    metadata: dict[str, str]
    nested: tuple[str, ...] = ()  # top-level groups of a nested pickle (IP-Adapter files are {"image_proj": ...})


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ModelFileError(f"Model file {path} does not exist.")
    if path.is_dir():
        raise ModelFileError(f"{path} is a folder, not a weights file.")
    if path.stat().st_size == 0:
        raise ModelFileError(f"Model file {path.name} is empty (0 bytes); download it again.")


# ---------------------------------------------------------------------------------------------- safetensors
def _safetensors_header(path: Path) -> tuple[dict, dict[str, str]]:
    """Parse and validate the JSON header; the tensor data must lie inside the file (catches truncation)."""
    size = path.stat().st_size
    corrupt = f"{path.name} is not a valid safetensors file (truncated or corrupt); download it again."
    with open(path, "rb") as handle:
        raw_len = handle.read(8)
        if len(raw_len) < 8:
            raise ModelFileError(corrupt)
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len <= 0 or 8 + header_len > size:
            raise ModelFileError(corrupt)
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ModelFileError(corrupt) from None
    if not isinstance(header, dict):
        raise ModelFileError(corrupt)
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - header_len
    for name, info in header.items():
        try:
            start, end = info["data_offsets"]
            dtype_ok = info["dtype"] in _SAFETENSORS_DTYPES
        except (TypeError, KeyError, ValueError):
            raise ModelFileError(corrupt) from None
        if not dtype_ok or not 0 <= start <= end <= data_size:
            raise ModelFileError(corrupt)
    return header, {str(k): str(v) for k, v in metadata.items()}


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, RuntimeError) as error:
        raise ModelFileError(f"{path.name} is not a valid safetensors file (truncated or corrupt): {error}.") from None


# ---------------------------------------------------------------------------------------------- pickles
def _torch_load(path: Path, advice: Optional[str] = None):
    """torch.load that refuses anything but tensors and plain containers: a pickle that would run code fails.
    `advice` ends the refusal (default: use a .safetensors version)."""
    corrupt = f"{path.name} could not be read as a PyTorch weights file (truncated or corrupt)"
    corrupt += f"; {advice}." if advice else "."
    advice = advice or "use a .safetensors version of this model"
    unsafe = (f"{path.name} contains Python objects other than weights, so it was not loaded (loading it could run "
              f"code); {advice}.")
    if _is_torchscript(path):
        # torch.load would warn and hand it to torch.jit.load; a program is no weights file: refuse it first
        raise ModelFileError(f"{path.name} is a TorchScript program, not a weights file, so it was not loaded "
                             f"(loading it could run code); {advice}.")
    try:
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            # Old (non-zip) torch files cannot be memory-mapped; read them normally.
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ModelFileError(unsafe) from None
    except (EOFError, zipfile.BadZipFile, RuntimeError, ValueError, struct.error, OSError, UnicodeDecodeError) as error:
        if "Weights only load failed" in str(error):
            raise ModelFileError(unsafe) from None
        raise ModelFileError(corrupt) from None


def check_pickled_weights(path: Path, advice: str) -> None:
    """A ModelFileError (ending in `advice`) unless the pickle at `path` holds only tensors and plain containers.
    For files other code loads with its own torch.load (controlnet-aux's annotators: unrestricted where torch is
    older than 2.6, as in the WebUI's venv). Memory-mapped where the format allows, so the tensors are not read."""
    _check_file(path)
    _torch_load(path, advice)


def _is_torchscript(path: Path) -> bool:
    """torch.jit.save archives are zip files holding `<name>/constants.pkl` (and code); torch.save never writes one."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            return any(name.split("/")[-1] == "constants.pkl" for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _flatten_pickle(obj, path: Path) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    if not isinstance(obj, dict):
        raise ModelFileError(f"{path.name} holds a {type(obj).__name__}, not a dictionary of weights.")
    for key in _NESTED_STATE_KEYS:  # training checkpoints wrap the weights one level down
        if isinstance(obj.get(key), dict) and any(isinstance(v, torch.Tensor) for v in obj[key].values()):
            obj = obj[key]
            break
    nested = tuple(k for k, v in obj.items() if isinstance(v, dict))
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for group in nested:  # e.g. IP-Adapter: {"image_proj": {...}, "ip_adapter": {...}}
        tensors.update({f"{group}.{k}": v for k, v in obj[group].items() if isinstance(v, torch.Tensor)})
    return tensors, nested


# ---------------------------------------------------------------------------------------------- public
def weights_file_of(folder: Path) -> Path:
    """The weights file of a diffusers folder."""
    if not (folder / "config.json").is_file():
        raise ModelFileError(f"Folder {folder.name} has no config.json, so it is not a diffusers ControlNet folder.")
    for name in DIFFUSERS_WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise ModelFileError(f"Folder {folder.name} has a config.json but no diffusion_pytorch_model.safetensors "
                         "or .bin weights.")


def read_header(path: Path) -> Header:
    path = Path(path)
    _check_file(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        header, metadata = _safetensors_header(path)
        return Header(
            shapes={k: tuple(v["shape"]) for k, v in header.items()},
            dtypes={k: _SAFETENSORS_DTYPES[v["dtype"]] for k, v in header.items()},
            metadata=metadata,
        )
    if path.suffix.lower() in PICKLE_SUFFIXES:
        tensors, nested = _flatten_pickle(_torch_load(path), path)  # memory-mapped where possible: cheap
        return Header({k: tuple(v.shape) for k, v in tensors.items()}, {k: v.dtype for k, v in tensors.items()},
                      {}, nested)
    raise ModelFileError(f"{path.name}: unknown file type {path.suffix or '(none)'}; expected one of "
                         f"{', '.join(WEIGHT_SUFFIXES)}.")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    _check_file(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        _safetensors_header(path)  # clear message for truncated files before the reader complains
        return _read_safetensors(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return _flatten_pickle(_torch_load(path), path)[0]
    raise ModelFileError(f"{path.name}: unknown file type {path.suffix or '(none)'}; expected one of "
                         f"{', '.join(WEIGHT_SUFFIXES)}.")
