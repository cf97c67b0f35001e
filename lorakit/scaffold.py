"""Writing a commented starter manifest for a set of adapters, for ``lorakit init``.

The manifest starts with a yaml-language-server modeline that points at the JSON Schema, so
editors offer completion and help for every key. Paths in it are relative to the manifest file.
Before anything is written, the text is loaded and planned exactly as ``lorakit validate`` would,
so ``init`` never writes a manifest that fails validation.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from lorakit.adapter import Adapter, open_adapter
from lorakit.errors import LorakitError, ManifestError, OutputError
from lorakit.manifest import load_manifest
from lorakit.methods import get_method, method_names
from lorakit.plan import build_plan, natural_key
from lorakit.schema import load_schema

__all__ = ["SCHEMA_FILE_NAME", "Scaffold", "scaffold_manifest", "write_scaffold"]

logger = logging.getLogger(__name__)

# The schema copy that the default modeline points at, written beside the manifest.
SCHEMA_FILE_NAME = "manifest.schema.json"

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Scaffold:
    """A validated manifest text and where it goes (``path`` None for standard output)."""

    text: str
    path: Path | None
    schema_path: Path | None


def _valid_name(text: str, fallback: str) -> str:
    """Turn ``text`` into a manifest or source name: letters, digits, '.', '_' and '-'."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).lstrip("._-")
    return name if _NAME_PATTERN.match(name) else fallback


def _source_names(folders: Sequence[Path]) -> list[str]:
    """Name each source after its folder, prefixing the parent folder's name where two collide."""
    plain = [_valid_name(folder.name, f"source{index}") for index, folder in enumerate(folders)]
    names = [
        _valid_name(f"{folder.parent.name}-{folder.name}", name) if plain.count(name) > 1 else name
        for folder, name in zip(folders, plain)
    ]
    return [f"{name}-{index}" if names.count(name) > 1 else name for index, name in enumerate(names)]


def _relative(path: Path, folder: Path) -> str:
    return Path(os.path.relpath(path.resolve(), folder.resolve())).as_posix()


def _quoted(value: Any) -> str:
    # JSON scalars are YAML scalars, and quoting keeps names such as "1e5" strings.
    return json.dumps(value)


def _check_options(method_name: str, rank: int | None, params: Mapping[str, Any], seeds: Sequence[int]) -> None:
    if method_name not in method_names():
        raise LorakitError(f"unknown merge method {method_name!r}; valid methods: {', '.join(method_names())}")
    method = get_method(method_name)
    if method.takes_rank and rank is None:
        raise LorakitError(f"method {method_name!r} needs a target rank; pass --rank, for example --rank 64")
    if not method.takes_rank and rank is not None:
        raise LorakitError(f"method {method_name!r} takes no rank (its output rank follows from the sources); drop --rank")
    for key in params:
        if key not in method.parameters:
            accepted = ", ".join(method.parameters) or "no parameters"
            raise LorakitError(f"method {method_name!r} takes no parameter {key!r} (it takes {accepted}); drop --param {key}=...")
    for key, parameter in method.parameters.items():
        if parameter.default is None and key not in params:
            raise LorakitError(f"method {method_name!r} needs {key!r} ({parameter.help}); pass --param {key}=VALUE")
    if seeds and not method.uses_seed:
        logger.warning("method %s draws nothing at random, so the seeds only matter if you add a method that does", method_name)


def _render(
    adapters: Sequence[Adapter],
    folders: Sequence[Path],
    manifest_folder: Path,
    name: str,
    method_name: str,
    rank: int | None,
    params: Mapping[str, Any],
    seeds: Sequence[int],
    output_path: str,
    schema_reference: str,
) -> str:
    method = get_method(method_name)
    projections = list(dict.fromkeys(adapters[0].modules[path].projection for path in sorted(adapters[0].modules, key=natural_key)))
    lines = [
        f"# yaml-language-server: $schema={schema_reference}",
        "# lorakit merge manifest written by `lorakit init`. Paths are relative to this file.",
        "# Check it with `lorakit validate`, preview the merge with `lorakit plan`, write it with `lorakit run`.",
        "version: 1",
        f"name: {_quoted(name)}",
        "# description: what this merge is for; copied into the provenance record and the model card",
        "",
        "# The adapters to merge, in order (block takes components in this order).",
        "sources:",
    ]
    for adapter, folder, source_name in zip(adapters, folders, _source_names(folders)):
        ranks = sorted({module.rank for module in adapter.modules.values()})
        lines += [
            f"  - path: {_quoted(_relative(folder, manifest_folder))}",
            f"    name: {_quoted(source_name)}  # r={'/'.join(map(str, ranks))}, lora_alpha={adapter.config.get('lora_alpha')}, "
            f"{len(adapter.modules)} modules",
            "    weight: 1.0  # w_i, the weight of this source's delta",
        ]

    lines += ["", "merge:", f"  method: {method_name}  # {method.summary}"]
    if rank is not None:
        lines.append(f"  rank: {rank}  # target rank K of every merged module")
    for key, parameter in method.parameters.items():
        if key in params:
            lines.append(f"  {key}: {_quoted(params[key])}  # {parameter.help}")
        else:
            lines.append(f"  # {key}: {_quoted(parameter.default)}  # default; {parameter.help}")
    lines += [
        "  # Merge only some projections (default: every one the sources adapt):",
        f"  # include: [{', '.join(projections)}]",
        "  # Per-module rules, tried in order before `projections`; the first match decides:",
        "  # rules:",
        '  #   - match: "model.layers.0.*"',
        "  #     method: cat",
        "  # Per-projection methods:",
        "  # projections:",
        f"  #   {projections[-1]}: cat",
        "",
    ]
    if seeds:
        lines += ["# One complete adapter per seed, in <output.path>/seed-<seed>/ when there are several.", f"seeds: [{', '.join(map(str, seeds))}]", ""]
    lines += [
        "output:",
        f"  path: {_quoted(output_path)}  # must not exist yet; `lorakit run --force` replaces it",
        "  dtype: source  # source (the sources' dtype), float32, float16 or bfloat16",
    ]
    return "\n".join(lines) + "\n"


def _validate(text: str, manifest_folder: Path, shown_as: str) -> None:
    """Load and plan ``text`` as a manifest in ``manifest_folder``; raise with positions in ``shown_as``."""
    probe = manifest_folder / f".lorakit-init-{os.getpid()}-{uuid.uuid4().hex[:8]}.yaml"
    try:
        probe.write_text(text, encoding="utf-8")
    except OSError as error:
        raise OutputError(f"{manifest_folder}: cannot write a temporary file to check the manifest: {error.strerror or error}") from error
    try:
        plan = build_plan(load_manifest(probe), device="cpu")
    except ManifestError as error:
        raise ManifestError([message.replace(str(probe), shown_as) for message in error.messages]) from error
    except LorakitError as error:
        raise type(error)(str(error).replace(str(probe), shown_as)) from error
    finally:
        probe.unlink(missing_ok=True)
    for adapter in plan.adapters:
        adapter.close()


def _make_folder(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return the created folders, deepest first."""
    created = []
    missing = folder
    while not missing.exists():
        created.append(missing)
        missing = missing.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"{folder}: cannot create the folder: {error.strerror or error}") from error
    return created


def scaffold_manifest(
    adapter_folders: Sequence[Path],
    method_name: str,
    rank: int | None = None,
    params: Mapping[str, Any] | None = None,
    seeds: Sequence[int] = (),
    output: Path | None = None,
    name: str | None = None,
    output_path: str | None = None,
    schema_reference: str | None = None,
) -> Scaffold:
    """Build and validate a commented manifest that merges ``adapter_folders``.

    Args:
        adapter_folders: PEFT adapter folders, in source order.
        method_name: the merge method of every module.
        rank: target rank K, for methods that take one.
        params: the method's extra parameters, such as ``density``.
        seeds: seeds for methods that draw at random; ``[0]`` when the method draws and none is given.
        output: the manifest file to write, or None for standard output (paths relative to the
            current folder then).
        name: the merge name; default the manifest file name without ``.yaml``, or ``merge``.
        output_path: ``output.path``, relative to the manifest; default ``../output/<name>``.
        schema_reference: the modeline's schema; default ``manifest.schema.json`` beside the manifest.

    Raises:
        LorakitError: for options the method rejects, adapters lorakit cannot merge, or an
            existing manifest file.
        ManifestError: when the manifest would not validate, with positions in the file it would be written to.
    """
    params = dict(params or {})
    _check_options(method_name, rank, params, seeds)
    if get_method(method_name).uses_seed and not seeds:
        seeds = [0]
    if not adapter_folders:
        raise LorakitError("name at least one adapter folder")

    manifest_folder = output.parent if output is not None else Path.cwd()
    default_name = output.name.removesuffix(".yaml").removesuffix(".yml") if output is not None else "merge"
    name = name or _valid_name(default_name, "merge")
    if not _NAME_PATTERN.match(name):
        raise LorakitError(f"--name {name!r} is not a valid name; use letters, digits, '.', '_' and '-', starting with a letter or digit")

    adapters = []
    try:
        for index, folder in enumerate(adapter_folders):
            adapters.append(open_adapter(Path(folder), f"source{index}"))
    except LorakitError:
        for adapter in adapters:
            adapter.close()
        raise
    folders = [Path(folder) for folder in adapter_folders]
    text = _render(
        adapters,
        folders,
        manifest_folder,
        name,
        method_name,
        rank,
        params,
        seeds,
        output_path or f"../output/{name}",
        schema_reference or SCHEMA_FILE_NAME,
    )
    for adapter in adapters:
        adapter.close()

    created = _make_folder(manifest_folder)
    try:
        _validate(text, manifest_folder, str(output) if output is not None else "<stdout>")
    except LorakitError:
        for folder in created:
            folder.rmdir()
        raise
    schema_path = manifest_folder / SCHEMA_FILE_NAME if output is not None and schema_reference is None else None
    return Scaffold(text=text, path=output, schema_path=schema_path)


def write_scaffold(scaffold: Scaffold, force: bool = False) -> list[Path]:
    """Write the manifest, and the schema copy its modeline points at when that is missing.

    Returns the paths written.

    Raises:
        LorakitError: when the manifest exists and ``force`` is false.
        OutputError: when writing fails.
    """
    if scaffold.path is None:
        raise ValueError("a scaffold for standard output has no file to write")
    written = []
    if scaffold.path.exists() and not force:
        raise LorakitError(f"{scaffold.path}: already exists; pass --force to replace it, or choose another -o")
    temporary = scaffold.path.with_name(f".{scaffold.path.name}.lorakit-{uuid.uuid4().hex[:8]}")
    try:
        temporary.write_text(scaffold.text, encoding="utf-8")
        os.replace(temporary, scaffold.path)
        written.append(scaffold.path)
        if scaffold.schema_path is not None and not scaffold.schema_path.exists():
            scaffold.schema_path.write_text(json.dumps(load_schema(), indent=2) + "\n", encoding="utf-8")
            written.append(scaffold.schema_path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise OutputError(f"{error.filename or scaffold.path}: cannot write: {error.strerror or error}") from error
    return written
