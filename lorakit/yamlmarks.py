"""YAML loading that keeps the line and column of every key and rejects duplicate keys.

PyYAML's safe loader silently keeps the last of two equal keys, and its Python objects carry no
positions. This module composes the node tree itself so that every error can point at
``FILE:LINE:COL`` (1-based, as editors count).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lorakit.errors import ManifestError

__all__ = ["KeyPath", "MarkedDocument", "load_marked_yaml"]

KeyPath = tuple[Any, ...]


@dataclass(frozen=True)
class MarkedDocument:
    """A parsed YAML document and where each value and each mapping key starts in its file."""

    path: Path
    data: Any
    marks: dict[KeyPath, tuple[int, int]]
    key_marks: dict[KeyPath, tuple[int, int]]

    def where(self, key_path: KeyPath) -> str:
        """Format ``FILE:LINE:COL`` of the value at the deepest known prefix of ``key_path``."""
        return self._format(self.marks, key_path)

    def where_key(self, key_path: KeyPath) -> str:
        """Format ``FILE:LINE:COL`` of the mapping key that ends ``key_path`` (for unknown keys)."""
        return self._format(self.key_marks, key_path)

    def _format(self, marks: dict[KeyPath, tuple[int, int]], key_path: KeyPath) -> str:
        path = tuple(key_path)
        while path not in marks and path:
            path = path[:-1]
        line, column = marks.get(path, self.marks.get(path, (1, 1)))
        return f"{self.path}:{line}:{column}"


def _position(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _convert(node: yaml.Node, constructor: yaml.SafeLoader, key_path: KeyPath, marks: dict, key_marks: dict, file: Path) -> Any:
    marks[key_path] = _position(node)

    if isinstance(node, yaml.MappingNode):
        # Merge keys (<<) would hide where a value came from; manifests have no use for them.
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                line, column = _position(key_node)
                raise ManifestError(f"{file}:{line}:{column}: YAML merge keys (<<) are not supported; write the keys out")
            key = constructor.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                line, column = _position(key_node)
                raise ManifestError(f"{file}:{line}:{column}: a mapping key must be a plain scalar, got {type(key).__name__}")
            if key in result:
                line, column = _position(key_node)
                first_line, _ = key_marks[key_path + (key,)]
                raise ManifestError(
                    f"{file}:{line}:{column}: duplicate key {key!r} (first defined on line {first_line}); "
                    "remove one of them"
                )
            key_marks[key_path + (key,)] = _position(key_node)
            result[key] = _convert(value_node, constructor, key_path + (key,), marks, key_marks, file)
        return result

    if isinstance(node, yaml.SequenceNode):
        return [
            _convert(item, constructor, key_path + (index,), marks, key_marks, file) for index, item in enumerate(node.value)
        ]

    return constructor.construct_object(node, deep=True)


def load_marked_yaml(path: Path, text: str) -> MarkedDocument:
    """Parse one YAML document from ``text``, recording where each key path starts.

    Raises:
        ManifestError: on a syntax error (with its position), a duplicate key, several documents,
            or an empty file.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise ManifestError(f"{path}:1:1: the manifest is empty; start from an example in manifests/")
        marks: dict[KeyPath, tuple[int, int]] = {}
        key_marks: dict[KeyPath, tuple[int, int]] = {}
        data = _convert(node, loader, (), marks, key_marks, path)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = error.problem or error.context or "invalid YAML"
        hint = "; indent with spaces, not tabs" if "\\t" in problem or "\t" in problem else ""
        raise ManifestError(f"{path}:{line}:{column}: invalid YAML: {problem}{hint}") from error
    except yaml.YAMLError as error:
        raise ManifestError(f"{path}:1:1: invalid YAML: {error}") from error
    finally:
        loader.dispose()
    return MarkedDocument(path=path, data=data, marks=marks, key_marks=key_marks)
