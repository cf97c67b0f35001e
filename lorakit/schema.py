"""The manifest JSON Schema (``schemas/manifest.schema.json``) and readable messages for its errors."""

from __future__ import annotations

import difflib
import json
import reprlib
from functools import lru_cache
from importlib import resources
from typing import Any, Iterable

import jsonschema

__all__ = ["closest", "load_schema", "schema_errors"]

SCHEMA_FILE = "manifest.schema.json"


@lru_cache(maxsize=1)
def load_schema() -> dict[str, Any]:
    """Return the manifest schema shipped inside the package (the file ``schemas/`` links to)."""
    text = resources.files("lorakit").joinpath("data").joinpath(SCHEMA_FILE).read_text(encoding="utf-8")
    return json.loads(text)


def closest(name: str, choices: Iterable[str]) -> str:
    """Return `` (did you mean 'x'?)`` for the closest choice, or an empty string."""
    if not isinstance(name, (str, int, float)):
        return ""
    matches = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


# Bounds how much of a bad value a message quotes: YAML aliases can make a value of billions of items.
_REPR = reprlib.Repr()
_REPR.maxlevel = 2
_REPR.maxstring = 80
_REPR.maxother = 80


def short_repr(value: Any) -> str:
    """Return ``repr(value)`` cut to a few items per level and two levels deep."""
    return _REPR.repr(value)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


_TYPE_NAMES = {
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
    "array": "a list",
    "object": "a mapping",
    "boolean": "true or false",
}


def format_key_path(key_path: Iterable[Any]) -> str:
    """Format a key path as ``merge.projections.v_proj`` or ``sources[2].path``."""
    text = ""
    for part in key_path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "the manifest"


def _describe(error: jsonschema.ValidationError) -> tuple[tuple[Any, ...], str]:
    """Return the key path to point at and a message with the fix for one schema error.

    For an unknown key the path ends with that key; callers point at the key itself there.
    """
    path = tuple(error.absolute_path)
    where = format_key_path(path)
    value = error.instance
    schema = error.schema if isinstance(error.schema, dict) else {}

    if error.validator == "additionalProperties":
        allowed = sorted(schema.get("properties", {}))
        # YAML allows keys of several types (1, true, null), so keys sort by their text.
        unknown = sorted(set(value) - set(allowed), key=str) if isinstance(value, dict) else []
        if unknown:
            key = unknown[0]
            hint = closest(key, allowed)
            valid = f"; valid keys: {', '.join(allowed)}" if allowed else ""
            return path + (key,), f"unknown key {short_repr(key)} in {where}{hint}{valid}"
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        return path, f"{where} is missing the required key {missing!r}"
    if error.validator == "enum":
        choices = [str(choice) for choice in error.validator_value]
        return path, f"{where}: {short_repr(value)} is not valid{closest(value, choices)}; valid values: {', '.join(choices)}"
    if error.validator == "const":
        return path, f"{where}: {short_repr(value)} is not supported; use {error.validator_value!r}"
    if error.validator == "type":
        expected = error.validator_value
        names = [_TYPE_NAMES.get(name, name) for name in ([expected] if isinstance(expected, str) else expected)]
        shown = "" if value is None else f" ({short_repr(value)})"
        return path, f"{where} must be {' or '.join(names)}, got {_json_type(value)}{shown}"
    if error.validator in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        bound = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}[error.validator]
        return path, f"{where} must be {bound} {error.validator_value}, got {short_repr(value)}"
    if error.validator == "minItems":
        return path, f"{where} must list at least {error.validator_value} item(s)"
    if error.validator == "maxItems":
        return path, f"{where} must list at most {error.validator_value} items"
    if error.validator == "uniqueItems":
        return path, f"{where} lists a value twice; remove the duplicate"
    if error.validator == "pattern":
        return path, f"{where}: {short_repr(value)} is not a valid name; use letters, digits, '.', '_' and '-', starting with a letter or digit"
    if error.validator == "minLength":
        return path, f"{where} must not be empty"
    if error.validator == "oneOf" and error.context:
        # A projection override is a method name or a mapping: report the branch that fits the value's type.
        branch = 0 if isinstance(value, str) else 1
        relevant = [sub for sub in error.context if sub.relative_schema_path and sub.relative_schema_path[0] == branch]
        if relevant:
            return _describe(min(relevant, key=lambda sub: len(sub.absolute_path)))
        return path, f"{where} must be a method name or a mapping with a 'method' key, got {_json_type(value)}"
    message = error.message if len(error.message) <= 200 else f"{error.message[:200]}..."
    return path, f"{where}: {message}"


def schema_errors(data: Any) -> list[tuple[tuple[Any, ...], str, bool]]:
    """Validate ``data`` against the schema.

    Returns:
        Every error as (key path, message, whether the path ends in an unknown key).
    """
    validator = jsonschema.Draft202012Validator(load_schema())
    errors = []
    for error in validator.iter_errors(data):
        key_path, message = _describe(error)
        errors.append((key_path, message, message.startswith("unknown key")))
    return errors
