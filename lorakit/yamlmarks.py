"""YAML loading that keeps the line and column of every key and rejects duplicate keys.

PyYAML's safe loader silently keeps the last of two equal keys, and its Python objects carry no
positions. This module composes the node tree itself so that every error can point at
``FILE:LINE:COL`` (1-based, as editors count).
"""

from __future__ import annotations

import re
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


# Maximum number of values in a manifest with its aliases expanded. Real manifests have hundreds,
# but nested aliases ("billion laughs") can make a few lines expand to billions, which would stall
# every later step that walks or prints the data.
MAX_VALUES = 100_000


class _Converter:
    """Turn a composed node tree into Python values, recording where each value and key starts.

    An alias is the same node object as its anchor, so a node met a second time is an alias: it
    gets the value already built, and counts again towards ``MAX_VALUES``.
    """

    def __init__(self, constructor: yaml.SafeLoader, file: Path):
        self.constructor = constructor
        self.file = file
        self.marks: dict[KeyPath, tuple[int, int]] = {}
        self.key_marks: dict[KeyPath, tuple[int, int]] = {}
        self.done: dict[int, Any] = {}
        self.open: set[int] = set()
        self.sizes: dict[int, int] = {}

    def where(self, key_path: KeyPath) -> str:
        while key_path not in self.key_marks and key_path:
            key_path = key_path[:-1]
        line, column = self.key_marks.get(key_path, (1, 1))
        return f"{self.file}:{line}:{column}"

    def construct(self, node: yaml.Node) -> Any:
        # Some of PyYAML's scalar constructors raise ValueError (a timestamp with month 13, an
        # integer of more than 4300 digits) instead of a YAMLError.
        try:
            return self.constructor.construct_object(node, deep=True)
        except ValueError as error:
            line, column = _position(node)
            raise ManifestError(f"{self.file}:{line}:{column}: invalid value {node.value!r:.80}: {error}") from None

    def convert(self, node: yaml.Node, key_path: KeyPath) -> Any:
        if id(node) in self.open:
            raise ManifestError(
                f"{self.where(key_path)}: this YAML alias refers to a value that contains it; write the value out"
            )
        if id(node) in self.done:
            return self.done[id(node)]
        self.marks[key_path] = _position(node)

        self.open.add(id(node))
        if isinstance(node, yaml.MappingNode):
            value = self._mapping(node, key_path)
            children = [value_node for _, value_node in node.value]
        elif isinstance(node, yaml.SequenceNode):
            value = [self.convert(item, key_path + (index,)) for index, item in enumerate(node.value)]
            children = node.value
        else:
            value = self.construct(node)
            children = []
        self.open.discard(id(node))

        size = 1 + sum(self.sizes[id(child)] for child in children)
        if size > MAX_VALUES:
            raise ManifestError(
                f"{self.file}:{self.marks[key_path][0]}:{self.marks[key_path][1]}: this value contains more than "
                f"{MAX_VALUES} values once its YAML aliases are expanded; a manifest needs far fewer, so remove the aliases"
            )
        self.sizes[id(node)] = size
        self.done[id(node)] = value
        return value

    def _mapping(self, node: yaml.MappingNode, key_path: KeyPath) -> dict[Any, Any]:
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            line, column = _position(key_node)
            if key_node.tag == "tag:yaml.org,2002:merge":
                # Merge keys (<<) would hide where a value came from; manifests have no use for them.
                raise ManifestError(f"{self.file}:{line}:{column}: YAML merge keys (<<) are not supported; write the keys out")
            if not isinstance(key_node, yaml.ScalarNode):
                raise ManifestError(f"{self.file}:{line}:{column}: a mapping key must be a plain scalar, not a list or mapping")
            key = self.construct(key_node)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise ManifestError(f"{self.file}:{line}:{column}: a mapping key must be a plain scalar, got {type(key).__name__}")
            if key in result:
                first_line, _ = self.key_marks[key_path + (key,)]
                raise ManifestError(
                    f"{self.file}:{line}:{column}: duplicate key {key!r} (first defined on line {first_line}); "
                    "remove one of them"
                )
            self.key_marks[key_path + (key,)] = (line, column)
            result[key] = self.convert(value_node, key_path + (key,))
        return result


def _describe_yaml_error(path: Path, error: yaml.MarkedYAMLError) -> str:
    """Format PyYAML's problem, the construct it was reading and where that started, and a fix."""
    mark = error.problem_mark or error.context_mark
    line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
    problem = error.problem or error.context or "invalid YAML"
    context = ""
    if error.problem and error.context:
        started = f" started on line {error.context_mark.line + 1}" if error.context_mark else ""
        context = f" ({error.context}{started})"
    hint = ""
    if "\\t" in problem or "\t" in problem:
        hint = "; indent with spaces, not tabs"
    elif "another document" in problem:
        hint = "; a manifest is one YAML document, so remove the '---' line and what follows it"
    return f"{path}:{line}:{column}: invalid YAML: {problem}{context}{hint}"


def _describe_reader_error(path: Path, text: str, error: yaml.reader.ReaderError) -> str:
    """Locate a character YAML does not allow (a control character) by line and column."""
    before = text[: error.position]
    line = before.count("\n") + 1
    column = error.position - (before.rfind("\n") + 1) + 1
    return (
        f"{path}:{line}:{column}: invalid YAML: the character U+{error.character:04X} is not allowed in YAML "
        "text; remove it"
    )


class _ManifestLoader(yaml.SafeLoader):
    """The safe loader, also reading YAML 1.2 floats such as ``5e-1`` and ``1e300``.

    PyYAML follows YAML 1.1, where an exponent needs a dot and a sign, so ``5e-1`` would be a string.
    """


_ManifestLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_marked_yaml(path: Path, text: str) -> MarkedDocument:
    """Parse one YAML document from ``text``, recording where each key path starts.

    Raises:
        ManifestError: on a syntax error (with its position), a duplicate key, several documents,
            or an empty file.
    """
    try:
        loader = _ManifestLoader(text)
    except yaml.reader.ReaderError as error:
        raise ManifestError(_describe_reader_error(path, text, error)) from None
    try:
        node = loader.get_single_node()
        if node is None:
            raise ManifestError(f"{path}:1:1: the manifest is empty; start from an example in manifests/")
        converter = _Converter(loader, path)
        data = converter.convert(node, ())
    except RecursionError:
        raise ManifestError(f"{path}:1:1: the YAML is nested too deeply to read; a manifest needs at most a few levels") from None
    except yaml.MarkedYAMLError as error:
        raise ManifestError(_describe_yaml_error(path, error)) from error
    except yaml.reader.ReaderError as error:
        raise ManifestError(_describe_reader_error(path, text, error)) from None
    except yaml.YAMLError as error:
        raise ManifestError(f"{path}:1:1: invalid YAML: {error}") from error
    finally:
        loader.dispose()
    return MarkedDocument(path=path, data=data, marks=converter.marks, key_marks=converter.key_marks)
