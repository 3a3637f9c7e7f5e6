"""Loading weights into a freshly built backbone: read a file without unpickling code, fit the
state dict to the target (re-patch a ViT, drop a head of another size) and load it strictly.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from torch import nn

from vptlab.errors import ConfigError

StateDict = dict[str, torch.Tensor]
# Prefixes that wrappers add in front of a backbone's keys: our ImageClassifier ("net."),
# DataParallel/DDP ("module.") and some training scripts ("model.").
_WRAPPER_PREFIXES = ("net.", "module.", "model.")


def read_state_dict(path: str | Path) -> StateDict:
    """Tensors of a `.safetensors` file, or of a `.pth`/`.pt`/`.bin` file read with weights_only."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pretrained weights not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        state = load_file(str(path))
    elif suffix in (".pth", ".pt", ".bin"):
        try:
            # weights_only: a checkpoint is data; a pickle that names other objects runs code.
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            first_line = str(error).strip().splitlines()[0]
            raise ConfigError(
                f"{path} holds more than tensors, so it is refused "
                f"(loaded with weights_only=True): {first_line}"
            ) from None
    else:
        raise ConfigError(f"pretrained weights must be .safetensors, .pth, .pt or .bin, got {path}")
    # Training scripts often save {"model": state} or {"state_dict": state}.
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path} does not hold a state dict of tensors")
    return strip_wrapper_prefix(state)


# (resolved path, inode, size, mtime in ns) -> sha256: a ViT-B file is 340 MB, so each file is
# hashed once per process; a rewrite (new inode or mtime) is hashed anew.
_DIGESTS: dict[tuple[str, int, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """The sha256 of a weights file: it pins the backbone a prompt or linear run was trained on."""
    path = Path(path).resolve()
    stat = os.stat(path)
    key = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def strip_wrapper_prefix(state: StateDict) -> StateDict:
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            return strip_wrapper_prefix({k[len(prefix) :]: v for k, v in state.items()})
    return state


def resample_vit_state(state: StateDict, net: nn.Module) -> StateDict:
    """Fit a ViT state dict to `net`'s patch size and token grid (timm attribute names).

    The patch kernel is resampled with FlexiViT's pseudo-inverse (`resample_patch_embed`): the new
    kernel on a patch shrunk from 16x16 to 4x4 gives about the token the old one gave on the full
    patch. The position embedding is interpolated to the new grid, the class token's entry kept.
    """
    state = dict(state)
    kernel = state.get("patch_embed.proj.weight")
    if kernel is not None and hasattr(net, "patch_embed"):
        target = net.patch_embed.proj.weight.shape[-2:]
        if kernel.shape[-2:] != target:
            state["patch_embed.proj.weight"] = resample_patch_embed(kernel, list(target))
    pos_embed = state.get("pos_embed")
    if pos_embed is not None and getattr(net, "pos_embed", None) is not None:
        if pos_embed.shape != net.pos_embed.shape:
            num_prefix = 0 if getattr(net, "no_embed_class", False) else net.num_prefix_tokens
            state["pos_embed"] = resample_abs_pos_embed(
                pos_embed, new_size=list(net.patch_embed.grid_size), num_prefix_tokens=num_prefix
            )
    return state


def classifier_keys(net: nn.Module) -> set[str]:
    """State-dict keys of the module `net.get_classifier()` returns (e.g. `head.weight`)."""
    classifier = net.get_classifier()
    for name, module in net.named_modules():
        if module is classifier:
            prefix = f"{name}." if name else ""
            return {prefix + k for k in module.state_dict()}
    return set()


def load_backbone_state(
    net: nn.Module, state: StateDict, source: str, keep_head: bool = False
) -> nn.Module:
    """Load `state` into `net`; every key but the classifier's must be there with the right shape.

    The classifier is dropped (kept at its fresh init) unless `keep_head`: a backbone trained on
    another dataset maps its classes to outputs its own way, even when the class counts match.
    With `keep_head` the saved classifier must fit the model.
    """
    own = net.state_dict()
    head = classifier_keys(net)
    if keep_head:
        wrong_head = [k for k in sorted(head) if k in state and state[k].shape != own[k].shape]
        if wrong_head:
            k = wrong_head[0]
            raise ConfigError(
                f"model.keep_head is set, but the classifier '{k}' in {source} has shape "
                f"{tuple(state[k].shape)} and the model's {tuple(own[k].shape)}; "
                "set model.keep_head=false for a fresh head"
            )
    else:
        state = {k: v for k, v in state.items() if k not in head}
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state) - (set() if keep_head else head))
    wrong = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing[:5])}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected[:5])}")
    if wrong:
        problems.extend(
            f"'{k}' has shape {tuple(state[k].shape)}, the model expects {tuple(own[k].shape)}"
            for k in wrong[:5]
        )
    if problems:
        raise ConfigError(
            f"pretrained weights {source} do not fit the model: {'; '.join(problems)}"
        )
    net.load_state_dict(state, strict=False)
    return net


def load_pretrained_file(
    net: nn.Module,
    path: str | Path,
    adapt: Callable[[StateDict, nn.Module], StateDict] | None = None,
    keep_head: bool = False,
) -> nn.Module:
    """Read `path`, pass it through `adapt(state, net)` (re-patching, key renames) and load it;
    the file's classifier only with `keep_head`."""
    state = read_state_dict(path)
    if adapt is not None:
        state = adapt(state, net)
    return load_backbone_state(net, state, str(path), keep_head=keep_head)


def load_own_weights(
    name: str,
    net: nn.Module,
    pretrained: bool | str | Path,
    keep_head: bool = False,
    adapt: Callable[[StateDict, nn.Module], StateDict] | None = None,
) -> nn.Module:
    """A model of ours (`name`) has no published weights: `pretrained=True` is an error naming
    it, a path is loaded (`load_pretrained_file`), False leaves `net` at its initialisation."""
    if pretrained is True:
        raise ConfigError(f"{name} has no published weights; pass pretrained=path/to/file")
    if pretrained:
        load_pretrained_file(net, pretrained, adapt=adapt, keep_head=keep_head)
    return net
