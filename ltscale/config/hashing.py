"""Stable content hashes of configs, used as lineage keys."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ltscale.config.overrides import config_to_dict


def config_hash(*parts: Any, length: int = 16) -> str:
    """sha256 over the canonical JSON of ``parts`` (configs, parent hashes, fingerprints)."""
    payload = json.dumps([config_to_dict(p) for p in parts], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:length]
