"""Atomic, pickle-free checkpoints: weights in safetensors, loop state via `weights_only=True`."""

from __future__ import annotations

import hashlib
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from vptlab.errors import VptlabError
from vptlab.runs import atomic_write


def learned_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers that a run learns without an optimizer (a label mapping chosen from data), by
    state-dict key: those a module lists in its `learned_buffers` attribute (buffer names)."""
    found = {}
    for prefix, module in model.named_modules():
        for name in getattr(module, "learned_buffers", ()):
            found[f"{prefix}.{name}" if prefix else name] = getattr(module, name)
    return found


def trained_keys(model: nn.Module) -> set[str]:
    """State-dict keys of what a frozen-backbone run trains: parameters that require grad and
    `learned_buffers`."""
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    return trainable | set(learned_buffers(model))


def model_state(model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The model's tensors; with `trainable_only`, just parameters that require grad and
    `learned_buffers`.

    Typically those are the prompts and the head (and a pixel prompt's label mapping).
    """
    if trainable_only:
        state = {k: p for k, p in model.named_parameters() if p.requires_grad}
        state |= learned_buffers(model)
    else:
        state = model.state_dict()
    # safetensors refuses shared or non-contiguous storage: store independent copies.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_model(
    model: nn.Module,
    path: str | Path,
    trainable_only: bool = False,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write the model's tensors (or just the trained ones) with string `metadata` beside them.

    A model built from a weights file also records that file and its sha256, so that prompts or a
    head saved alone are never loaded onto other backbone weights (see `load_model`).
    """
    state = model_state(model, trainable_only)
    meta = {**(metadata or {}), "trainable_only": str(trainable_only)}
    if getattr(model, "backbone_sha256", None):
        meta |= {"backbone_file": model.backbone_file, "backbone_sha256": model.backbone_sha256}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))


def load_model(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a safetensors checkpoint into `model`.

    A partial checkpoint (trainable only) must cover every trainable tensor, and, if it was trained
    on a backbone file, `model` must have been built from a file with the same sha256.
    """
    path = Path(path)
    if not path.is_file():
        raise VptlabError(f"checkpoint not found: {path}")
    state = _read_tensors(path, str(next(model.parameters()).device))
    # Keys an older version of the model's class saved under another name (`legacy_keys`).
    for old, new in (getattr(model, "legacy_keys", None) or {}).items():
        if old in state and new not in state:
            state[new] = state.pop(old)
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise VptlabError(
            f"checkpoint {path} does not fit this model; "
            f"unexpected keys: {', '.join(unexpected[:5])}"
        )
    trainable = trained_keys(model)
    meta = read_metadata(path)
    partial = meta.get("trainable_only") == "True"
    # Prompts and heads are only meaningful on the weights they were trained with: a retrained or
    # replaced backbone file must fail loudly, not run the saved prompts on other weights.
    saved, now = meta.get("backbone_sha256"), getattr(model, "backbone_sha256", None)
    if partial and saved and now != saved:
        file = meta.get("backbone_file", "?")
        found = (
            f"{model.backbone_file} now has sha256 {now[:12]}: the backbone was retrained or "
            "replaced; restore that file or train this run again"
            if now
            else f"the model was built without it; build it with pretrained={file}"
        )
        raise VptlabError(
            f"checkpoint {path} was trained on backbone {file} (sha256 {saved[:12]}), but {found}"
        )
    missing = sorted((trainable if partial else set(own)) - set(state))
    if missing:
        raise VptlabError(f"checkpoint {path} lacks keys: {', '.join(missing[:5])}")
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise VptlabError(
                f"checkpoint {path}: '{key}' has shape {tuple(value.shape)}, "
                f"the model expects {tuple(own[key].shape)}"
            )
    model.load_state_dict(state, strict=False)
    return model


def tensor_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 of names, dtypes, shapes and bytes of a state dict: identifies a set of weights."""
    h = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _read_tensors(path: Path, device: str) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a truncated or foreign file is one error naming it."""
    try:
        return load_file(str(path), device=device)
    except Exception as error:  # SafetensorError, or an OSError from a damaged file
        raise VptlabError(f"checkpoint {path} is damaged or not a safetensors file: "
                          f"{_one_line(error)}") from None  # fmt: skip


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:200] + ("..." if len(text) > 200 else "")


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata in a safetensors header, without reading the tensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as error:
        raise VptlabError(f"checkpoint {path} is damaged or not a safetensors file: "
                          f"{_one_line(error)}") from None  # fmt: skip


def save_state(state: dict[str, Any], path: str | Path) -> None:
    """Optimizer/scheduler/RNG state: plain tensors and containers, readable with weights_only.

    Written through a Python file, so that a refused write raises the OSError that says why
    (torch's own file writer only reports "unexpected pos")."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(state, f)

    atomic_write(path, write)


def load_state(path: str | Path) -> dict[str, Any]:
    """The loop state, read with `weights_only=True`: a file holding anything beyond tensors and
    plain containers (a pickle that would run code) is refused unrun, as is a damaged one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise VptlabError(f"checkpoint state not found: {path}") from None
    except pickle.UnpicklingError as error:
        # torch's message is a page of advice to load it unsafely: name the offending global only.
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        what = f": it references {found.group(1)}" if found else ""
        raise VptlabError(f"checkpoint state {path} holds more than tensors and plain containers "
                          f"(refused unread{what})") from None  # fmt: skip
    except Exception as error:  # EOFError, RuntimeError (a broken zip), ...
        raise VptlabError(f"checkpoint state {path} is damaged (refused unread): "
                          f"{_one_line(error)}") from None  # fmt: skip
    if not isinstance(state, dict):
        raise VptlabError(f"checkpoint state {path} holds a {type(state).__name__}, not a dict")
    return state

