"""The manifest schema documents every key for editors, and `lorakit schema` prints it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
from conftest import run_cli

from lorakit.schema import load_schema

REPOSITORY = Path(__file__).resolve().parents[1]


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = schema["$defs"][node["$ref"].removeprefix("#/$defs/")]
    return node


def _documented_nodes(schema: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (key path, schema) for the root, every property, list item and mapping value, refs resolved."""
    pending = [("$", schema)]
    seen: set[int] = set()
    while pending:
        where, node = pending.pop()
        resolved = _resolve(schema, node)
        yield where, resolved
        if id(resolved) in seen:
            continue
        seen.add(id(resolved))
        for name, child in resolved.get("properties", {}).items():
            pending.append((f"{where}.{name}", child))
        if isinstance(resolved.get("items"), dict):
            pending.append((f"{where}[]", resolved["items"]))
        values = resolved.get("additionalProperties")
        if isinstance(values, dict):
            for index, alternative in enumerate(values.get("oneOf", [values])):
                pending.append((f"{where}.<name>({index})", alternative))


def test_schema_every_key_has_description_and_examples() -> None:
    schema = load_schema()

    nodes = dict(_documented_nodes(schema))

    assert {"$.sources[]", "$.merge.rules[]", "$.merge.projections.<name>(1)", "$.output.dtype"} <= set(nodes)
    for where, node in nodes.items():
        assert node.get("description"), f"{where} has no description"
        assert node.get("examples"), f"{where} has no examples"


def test_schema_examples_are_valid() -> None:
    schema = load_schema()

    for where, node in _documented_nodes(schema):
        validator = jsonschema.Draft202012Validator({**node, "$defs": schema["$defs"]})
        for example in node["examples"]:
            errors = [error.message for error in validator.iter_errors(example)]
            assert not errors, f"{where} example {example!r}: {errors}"


def test_schema_command_prints_schema() -> None:
    result = run_cli("schema")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == load_schema()


@pytest.mark.parametrize("path", ["schemas/manifest.schema.json", "lorakit/data/manifest.schema.json"])
def test_schema_files_match_packaged(path: str) -> None:
    assert json.loads((REPOSITORY / path).read_text()) == load_schema()
