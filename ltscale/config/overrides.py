"""Typed ``key=value`` overrides on nested dataclass configs.

A config is a tree of dataclasses (and ``dict[str, <dataclass>]`` for named stages). An override
``stages.teacher.optim.lr=0.05`` walks that tree; the value is parsed according to the field's
annotation, and an unknown key or a value of the wrong type is rejected with the valid choices
(and the closest matches) named in the error. ``*`` in place of a stage name sets the field in
every stage that has it (``stages.*.optim.epochs=2``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from typing import Any, Iterable, Literal, Union, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A config value or override that cannot be used, with a message saying how to fix it."""


def _close(word: str, choices: list[str]) -> str:
    matches = difflib.get_close_matches(word, choices, n=3, cutoff=0.5)
    return f" Did you mean {', '.join(repr(m) for m in matches)}?" if matches else ""


def _type_name(annotation: Any) -> str:
    """``int``, ``float``, ``tuple[int, ...]``, ``one of 'a', 'b'``: how an error names a field's type."""
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(c) for c in get_args(annotation))
    return getattr(annotation, "__name__", None) if get_origin(annotation) is None else str(annotation).replace("typing.", "")


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"expected a boolean (true/false), got {text!r}")


def parse_value(text: str, annotation: Any, key: str) -> Any:
    """Parse ``text`` into a value of type ``annotation``; raise ConfigError naming ``key``."""
    origin = get_origin(annotation)
    try:
        if annotation is Any:
            return text
        if origin in (Union, types.UnionType):
            options = get_args(annotation)
            if type(None) in options and text.strip().lower() in {"none", "null", ""}:
                return None
            errors = []
            for option in options:
                if option is type(None):
                    continue
                try:
                    return parse_value(text, option, key)
                except ConfigError as error:
                    errors.append(str(error))
            raise ValueError(" / ".join(errors))
        if origin is Literal:
            choices = get_args(annotation)
            for choice in choices:
                if str(choice) == text:
                    return choice
            raise ConfigError(
                f"override {key}={text!r}: expected one of {', '.join(repr(c) for c in choices)}."
                + _close(text, [str(c) for c in choices])
            )
        if origin in (tuple, list):
            args = get_args(annotation)
            element = args[0] if args else str
            body = text.strip()
            closer = {"[": "]", "(": ")"}.get(body[:1])
            if closer:  # one optional pair of brackets around the whole list
                if not body.endswith(closer):
                    raise ConfigError(f"override {key}={text!r}: {body[0]!r} is not closed by {closer!r}")
                body = body[1:-1]
            if any(bracket in body for bracket in "[]()"):
                raise ConfigError(f"override {key}={text!r}: expected {_type_name(annotation)}, a flat list such as "
                                  "5,10 or [5,10] (lists do not nest)")
            items = [item.strip() for item in body.split(",")] if body.strip() else []
            if items and not items[-1]:
                items.pop()  # a trailing comma, as Python allows
            if "" in items:
                raise ConfigError(f"override {key}={text!r}: an empty element between commas")
            values = [parse_value(item, element, key) for item in items]
            return tuple(values) if origin is tuple else values
        if annotation is bool:
            return _parse_bool(text)
        if annotation is int:
            return int(text)
        if annotation is float:
            return float(text)
        if annotation is str:
            return text
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(f"override {key}={text!r}: expected {_type_name(annotation)} ({error})") from None
    raise ConfigError(f"override {key}: fields of type {annotation!r} cannot be set from the command line")


def _field_types(obj: Any) -> dict[str, Any]:
    return get_type_hints(type(obj))


def _set(obj: Any, path: list[str], text: str, full_key: str) -> Any:
    """Return a copy of ``obj`` with ``path`` set to the parsed ``text`` (configs stay immutable)."""
    head, rest = path[0], path[1:]
    if isinstance(obj, dict) and head == "*":
        # ``stages.*.optim.epochs=2``: every entry that has the field (a soft-label stage has no optim).
        if not rest:
            raise ConfigError(f"override {full_key!r} names whole sections; set one of their fields instead")
        having = [name for name, value in obj.items() if _has_path(value, rest)]
        if not having:
            prefix = full_key.strip()[: -len(".".join(rest))]
            near = {prefix + key for value in obj.values() for key in _near_paths(value, rest)}
            raise ConfigError(f"unknown key {full_key!r}: none of {sorted(obj)} has {'.'.join(rest)!r}."
                              + suggest_keys(full_key, near))
        return {name: _set(value, rest, text, full_key) if name in having else value for name, value in obj.items()}
    if isinstance(obj, dict):
        if head not in obj:
            raise ConfigError(
                f"unknown key {full_key!r}: {head!r} is not one of {sorted(obj)}." + _close(head, list(obj))
            )
        if not rest:
            raise ConfigError(f"override {full_key!r} names a whole section; set one of its fields instead")
        updated = dict(obj)
        updated[head] = _set(obj[head], rest, text, full_key)
        return updated
    if not dataclasses.is_dataclass(obj):
        raise ConfigError(f"unknown key {full_key!r}: {type(obj).__name__} has no field {head!r}")
    names = [f.name for f in dataclasses.fields(obj)]
    if head not in names:
        raise ConfigError(
            f"unknown key {full_key!r}: {type(obj).__name__} has no field {head!r} "
            f"(fields: {', '.join(names)})." + _close(head, names)
        )
    current = getattr(obj, head)
    if rest:
        return _replace(obj, head, _set(current, rest, text, full_key))
    if dataclasses.is_dataclass(current) or isinstance(current, dict):
        raise ConfigError(f"override {full_key!r} names a whole section; set one of its fields instead")
    value = parse_value(text, _field_types(obj)[head], full_key)
    return _replace(obj, head, value)


def has_key(config: Any, key: str) -> bool:
    """Whether ``config`` has the field a dotted override key names (``*``: any entry of a mapping)."""
    return _has_path(config, key.strip().split("."))


def _has_path(obj: Any, path: list[str]) -> bool:
    for index, name in enumerate(path):
        if isinstance(obj, dict) and name == "*":
            return any(_has_path(value, path[index + 1:]) for value in obj.values())
        if isinstance(obj, dict):
            if name not in obj:
                return False
            obj = obj[name]
        elif dataclasses.is_dataclass(obj) and name in {f.name for f in dataclasses.fields(obj)}:
            obj = getattr(obj, name)
        else:
            return False
    return True


def suggest_keys(key: str, near: Iterable[str]) -> str:
    """" Did you mean ...?" with the three of ``near`` closest to ``key`` (several stages each
    offer their own near fields: cut alphabetically, the closest could be left out), or ""."""
    ranked = difflib.get_close_matches(key.strip(), sorted(set(near)), n=3, cutoff=0)
    return f" Did you mean {', '.join(repr(k) for k in ranked)}?" if ranked else ""


def near_keys(config: Any, key: str) -> list[str]:
    """Existing dotted keys one misspelt name away from ``key`` (``*`` kept), for an error's suggestion."""
    return _near_paths(config, key.strip().split("."))


def _near_paths(obj: Any, path: list[str]) -> list[str]:
    """The paths that exist under ``obj`` when the first name that does not is replaced by a close one."""
    for index, name in enumerate(path):
        if isinstance(obj, dict) and name == "*":
            found = {key for value in obj.values() for key in _near_paths(value, path[index + 1:])}
            return [".".join([*path[:index + 1], key]) for key in sorted(found)]
        if isinstance(obj, dict):
            names = list(obj)
        elif dataclasses.is_dataclass(obj):
            names = [f.name for f in dataclasses.fields(obj)]
        else:
            return []
        if name not in names:
            fixed = ([*path[:index], match, *path[index + 1:]] for match in difflib.get_close_matches(name, names, n=3, cutoff=0.5))
            return [".".join(candidate) for candidate in fixed if _has_path(obj, candidate[index:])]
        obj = obj[name] if isinstance(obj, dict) else getattr(obj, name)
    return []


def _replace(obj: Any, name: str, value: Any) -> Any:
    """A copy of a (frozen) dataclass with one field changed and *no* validation yet: fields that
    must change together (milestones and their decay factors) are checked after all overrides."""
    updated = copy.copy(obj)
    object.__setattr__(updated, name, value)
    return updated


def validate(config: Any, path: str = "") -> None:
    """Run every ``__post_init__`` check in the tree, innermost first; an error names where it is."""
    if isinstance(config, dict):
        for key, value in config.items():
            validate(value, f"{path}.{key}" if path else str(key))
    elif dataclasses.is_dataclass(config) and not isinstance(config, type):
        for f in dataclasses.fields(config):
            validate(getattr(config, f.name), f"{path}.{f.name}" if path else f.name)
        check = getattr(config, "__post_init__", None)
        if check is not None:
            try:
                check()
            except ConfigError:
                raise
            except ValueError as error:
                if not path:
                    raise
                if str(error).startswith(path):  # the message already names where it is
                    raise ConfigError(str(error)) from None
                raise ConfigError(f"{path}: {error}") from None


def override_key(item: str) -> str:
    """The dotted key of a ``key=value`` override (``""`` for a malformed one, which
    :func:`apply_overrides` reports)."""
    key, sep, _ = item.partition("=")
    return key.strip() if sep else ""


def apply_overrides(config: Any, overrides: typing.Iterable[str]) -> Any:
    """Apply ``key=value`` strings in order and return the new config (the input is not mutated).

    The result is validated once all overrides are in (every ``__post_init__`` runs again), so
    coupled fields can be changed together.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (for example optim.lr=0.05)")
        key, text = override_key(item), item.split("=", 1)[1]
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        config = _set(config, key.split("."), text.strip(), key)
    validate(config)
    return config


def config_to_dict(config: Any) -> Any:
    """A JSON-ready nested dict of a config (tuples become lists)."""
    if dataclasses.is_dataclass(config):
        return {f.name: config_to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, dict):
        return {str(k): config_to_dict(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [config_to_dict(v) for v in config]
    return config


def flatten_config(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{"stages.teacher.optim.lr": 0.1, ...}``: the resolved config as MLflow params."""
    tree = config_to_dict(config)
    flat: dict[str, Any] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{path}.{key}" if path else key)
        else:
            flat[path] = node

    walk(tree, prefix)
    return flat
