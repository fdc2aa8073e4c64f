"""Starting a backbone from pretrained weights (``model.init_from``).

Places-LT is trained, in the long-tail literature, by fine-tuning an ImageNet-pretrained ResNet-152;
any recipe can start its networks from a checkpoint the same way. ``init_from`` is either

- ``torchvision:<Weights>.<NAME>`` (``torchvision:ResNet152_Weights.IMAGENET1K_V1``): torchvision's
  published weights, taken from the torch hub cache (``$TORCH_HOME/hub/checkpoints``) and downloaded
  there once, with torchvision's hash check, when missing; or
- a path to a ``.pth`` / ``.pt`` file holding a torchvision-layout state dict, bare or under
  ``state_dict`` / ``model`` (a ``module.`` prefix from DDP is removed).

The classifier of the checkpoint (``fc.*``) is dropped: heads always start fresh. Every other
backbone tensor must be there with the right shape, and nothing else may be: a checkpoint of another
architecture is an error naming the file and the keys, never a silently half-loaded network.

A stage's output key includes the checkpoint's identity (torchvision's file name, which embeds the
weights' hash, or the sha256 of a local file), so replacing the file at the same path retrains.
"""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ltscale.engine.checkpoint import file_checksum

TORCHVISION_PREFIX = "torchvision:"
_CLASSIFIER_PREFIXES = ("fc.",)
_WRAPPER_PREFIXES = ("module.",)


class PretrainedWeightsError(ValueError):
    """``model.init_from`` names weights that cannot be found, fetched or loaded."""


@dataclass(frozen=True)
class InitWeights:
    """``init_from`` resolved to a local file, with the identity that goes into stage keys."""

    spec: str
    path: Path
    identity: str


def _torchvision_weights(spec: str):
    name = spec[len(TORCHVISION_PREFIX) :]
    enum_name, _, member = name.partition(".")
    import torchvision.models as tvm

    try:
        enum = getattr(tvm, enum_name)
        return enum[member]
    except (AttributeError, KeyError, TypeError):
        raise PretrainedWeightsError(
            f"model.init_from={spec!r}: torchvision has no weights {name!r}; expected e.g. "
            "'torchvision:ResNet152_Weights.IMAGENET1K_V1' (a torchvision *_Weights enum and member)"
        ) from None


def resolve(spec: str, download: bool = True, identify: bool = True) -> InitWeights:
    """The local file ``spec`` names (downloading torchvision weights into the hub cache if allowed).

    ``identify=False`` skips hashing a local file (its identity is then ""): for processes that take
    the identity from rank 0.
    """
    if spec.startswith(TORCHVISION_PREFIX):
        weights = _torchvision_weights(spec)
        filename = os.path.basename(urllib.parse.urlparse(weights.url).path)
        path = Path(torch.hub.get_dir()) / "checkpoints" / filename
        if not path.is_file():
            if not download:
                raise PretrainedWeightsError(f"model.init_from={spec!r}: {path} is missing")
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                # torchvision's file names end in the first hex digits of the file's sha256.
                torch.hub.download_url_to_file(weights.url, str(path), hash_prefix=_hash_prefix(filename), progress=False)
            except Exception as error:  # noqa: BLE001 - any network / hash failure gets the same advice
                path.unlink(missing_ok=True)
                raise PretrainedWeightsError(
                    f"model.init_from={spec!r}: could not download {weights.url} ({type(error).__name__}: {error}). "
                    f"Without internet access, download it elsewhere and put it at {path}, "
                    "or set model.init_from to the file's path"
                ) from None
        return InitWeights(spec, path, identity(spec))
    path = Path(spec).expanduser()
    if not path.is_file():
        raise PretrainedWeightsError(f"model.init_from={spec!r}: no such file ({path.resolve()})")
    return InitWeights(spec, path.resolve(), f"sha256/{file_checksum(path)}" if identify else "")


def identity(spec: str) -> str:
    """What goes into a stage key for ``spec``, without downloading: torchvision's file name (it
    embeds the weights' hash), or the sha256 of a local file (which must exist)."""
    if spec.startswith(TORCHVISION_PREFIX):
        return f"torchvision/{os.path.basename(urllib.parse.urlparse(_torchvision_weights(spec).url).path)}"
    return resolve(spec).identity


def _hash_prefix(filename: str) -> str | None:
    stem = filename.split(".")[0]
    tail = stem.rsplit("-", 1)[-1]
    return tail if len(tail) >= 6 and all(c in "0123456789abcdef" for c in tail) else None


def _state_dict(payload: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(payload, dict):
        for key in ("state_dict", "model"):
            if isinstance(payload.get(key), dict):
                payload = payload[key]
                break
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise PretrainedWeightsError(f"{path}: expected a state dict of tensors (bare, or under 'state_dict' / 'model')")
    state = {}
    for key, value in payload.items():
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        state[key] = value
    return state


def load_backbone(backbone: nn.Module, weights: InitWeights) -> None:
    """Copy ``weights`` into ``backbone`` (its classifier dropped), refusing any mismatch."""
    try:
        payload = torch.load(weights.path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - unreadable, truncated, or not a torch file
        raise PretrainedWeightsError(f"{weights.path} (model.init_from={weights.spec!r}) cannot be read: "
                                     f"{type(error).__name__}: {error}") from None
    state = {k: v for k, v in _state_dict(payload, weights.path).items() if not k.startswith(_CLASSIFIER_PREFIXES)}
    expected = backbone.state_dict()
    # Checkpoints saved before PyTorch 0.4.1 (many published ImageNet ones) have no
    # batch-norm step counters; torch's own strict load keeps the module's, and so do we. The
    # counter only matters to BN with momentum=None, which no network here uses.
    missing = sorted(key for key in set(expected) - set(state) if not key.endswith(".num_batches_tracked"))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})"
             for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} of another shape (e.g. {', '.join(wrong[:2])})")
        raise PretrainedWeightsError(
            f"{weights.path} (model.init_from={weights.spec!r}) does not fit this backbone: {'; '.join(parts)}. "
            "Is it a checkpoint of the same model.arch?"
        )
    backbone.load_state_dict(state, strict=True)
