"""The recipe registry. A recipe is a function returning a typed pipeline config.

Recipes live in the top-level ``configs`` package; importing it registers them. Names are
``<dataset>/<method>``, for example ``cifar100-lt-if100/ssd``.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable

_RECIPES: dict[str, Callable[[], Any]] = {}
_DESCRIPTIONS: dict[str, str] = {}


def recipe(name: str, description: str = "") -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    """Register ``fn`` under ``name``; a second registration of the same name is a bug."""

    def register(fn: Callable[[], Any]) -> Callable[[], Any]:
        if name in _RECIPES and _RECIPES[name] is not fn:
            raise ValueError(f"recipe {name!r} is registered twice ({_RECIPES[name].__module__}, {fn.__module__})")
        _RECIPES[name] = fn
        doc = (fn.__doc__ or "").strip()
        _DESCRIPTIONS[name] = description or (doc.splitlines()[0] if doc else "")
        return fn

    return register


def _load() -> None:
    importlib.import_module("configs")


def list_recipes() -> dict[str, str]:
    """All recipe names with their one-line descriptions, sorted."""
    _load()
    return {name: _DESCRIPTIONS[name] for name in sorted(_RECIPES)}


def get_recipe(name: str) -> Any:
    """Build the config of recipe ``name``; unknown names are rejected with close matches."""
    _load()
    if name not in _RECIPES:
        from ltscale.config.overrides import ConfigError

        close = difflib.get_close_matches(name, list(_RECIPES), n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"unknown recipe {name!r}.{hint} Run `ltscale recipes` to list all {len(_RECIPES)}.")
    return _RECIPES[name]()
