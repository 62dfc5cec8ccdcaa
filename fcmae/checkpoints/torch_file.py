"""torch.save files (.pt / .pth / .bin), read with `weights_only=True`: never unpickling arbitrary objects."""

from __future__ import annotations

import argparse
import json
import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

__all__ = ["read_torch_file", "unwrap_state"]

StateDict = dict[str, Tensor]


def read_torch_file(path: Path) -> tuple[StateDict, dict[str, str]]:
    """(state dict, metadata) of a torch.save file, bare or wrapped as {'model': ...} / {'state_dict': ...}.

    An official checkpoint's argparse.Namespace `args` is the one non-tensor type allowed; its plain values are
    returned as metadata {"args": JSON}. A file that needs any other Python object is refused, naming them.
    """
    return unwrap_state(_torch_load(path), str(path))


def _torch_load(path: Path) -> Any:
    try:
        with warnings.catch_warnings():  # a plain pickle's protocol: refused below, with the real reason
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError:
                with torch.serialization.safe_globals([argparse.Namespace]):
                    return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's message is advice (which we must not pass on: weights_only=False) around the reason; read the
        # pickle's imports ourselves instead, without running it.
        imports = pickle_imports(path)
        if imports is None:
            raise ValueError(f"{path} is not a PyTorch or safetensors checkpoint") from None
        named = f" ({', '.join(imports[:4])})" if imports else ""
        raise ValueError(f"{path} was refused: loading it needs arbitrary unpickling, which can run code; it holds "
                         f"Python objects beyond tensors{named}. It was not loaded; if you trust it, re-save its "
                         "state dict with torch.save or safetensors") from None
    except Exception as e:  # torch raises RuntimeError, KeyError, EOFError... for foreign or truncated files
        raise ValueError(f"{path} is not a readable PyTorch or safetensors checkpoint ({first_line(e)})") from None


def pickle_imports(path: Path) -> list[str] | None:
    """The module.name globals a pickle (plain, or torch's zip) would import, not counting torch's own storage
    types; None if the file is no pickle at all. Reads the opcodes only: nothing is executed."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                if name is None:
                    return None
                data = archive.read(name)
        else:
            data = path.read_bytes()
        if not data.startswith(b"\x80"):  # every pickle of protocol 2 or later starts with PROTO
            return None
        found, strings = [], []
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
                strings.append(arg)
            elif op.name == "GLOBAL":
                found.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # a damaged pickle stops the scan: report what was found so far
        return None if not locals().get("found") else found
    safe = re.compile(r"^(torch\.|collections\.OrderedDict|_codecs\.encode|argparse\.Namespace)")
    return list(dict.fromkeys(name for name in found if not safe.match(name)))


def unwrap_state(obj: Any, where: str) -> tuple[StateDict, dict[str, str]]:
    """The state dict inside a loaded checkpoint (bare, or under 'model' / 'state_dict'), and metadata."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where} is not a checkpoint: it holds a {type(obj).__name__}, not a dict of tensors")
    container = next((k for k in ("model", "state_dict") if isinstance(obj.get(k), Mapping)), None)
    state = obj[container] if container else obj
    if not any(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{where} holds no model weights (keys: {', '.join(map(str, list(state)[:8]))})")
    bad = [str(k) for k, v in state.items() if not (isinstance(k, str) and isinstance(v, Tensor))]
    if bad:
        raise ValueError(f"{where}: entries that are not named tensors among the weights: {', '.join(bad[:8])}")
    metadata = {}
    args = vars(obj["args"]) if isinstance(obj.get("args"), argparse.Namespace) else obj.get("args")
    if container and isinstance(args, Mapping):
        plain = {k: v for k, v in args.items() if isinstance(v, (str, int, float, bool)) or v is None}
        metadata["args"] = json.dumps(plain)
    return dict(state), metadata


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")
