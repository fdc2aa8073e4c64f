"""Stable content hashes of configs, used as lineage keys."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from ltscale.config.overrides import config_to_dict

# Field metadata: the field was added after stages were stored; at its default it is left out of
# hashes, so the stages keyed before it existed (whose behaviour is that default) are still found.
KEYED_WHEN_SET = "ltscale.keyed_when_set"


def keyed_when_set(default: Any) -> Any:
    """A dataclass field (immutable ``default``) that enters a key only when it differs from it."""
    return dataclasses.field(default=default, metadata={KEYED_WHEN_SET: True})


def key_view(config: Any) -> Any:
    """``config`` as hashes see it: a JSON-ready tree without the ``keyed_when_set`` fields that
    hold their defaults."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: key_view(getattr(config, f.name)) for f in dataclasses.fields(config)
                if not (f.metadata.get(KEYED_WHEN_SET) and getattr(config, f.name) == f.default)}
    if isinstance(config, dict):
        return {str(k): key_view(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [key_view(v) for v in config]
    return config_to_dict(config)


def config_hash(*parts: Any, length: int = 16) -> str:
    """sha256 over the canonical JSON of ``parts`` (configs, parent hashes, fingerprints)."""
    payload = json.dumps([key_view(p) for p in parts], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:length]
