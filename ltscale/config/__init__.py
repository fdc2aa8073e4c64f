"""Typed configs: dotted overrides, hashing, and the recipe registry."""

from ltscale.config.overrides import ConfigError, apply_overrides, config_to_dict, flatten_config, override_key
from ltscale.config.hashing import config_hash
from ltscale.config.registry import get_recipe, list_recipes, recipe

__all__ = [
    "ConfigError",
    "apply_overrides",
    "config_hash",
    "config_to_dict",
    "flatten_config",
    "get_recipe",
    "list_recipes",
    "override_key",
    "recipe",
]
