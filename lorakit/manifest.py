"""Loading and validating merge manifests into frozen objects.

``load_manifest`` reads the YAML (keeping positions), checks it against the JSON Schema, then runs
the checks a schema cannot express: method parameters, seeds, duplicate names and output paths.
Checks that need the adapters (projection names, ranks) run when the plan is built. Every
error is collected and reported at once as ``FILE:LINE:COL: message``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import ManifestError, OutputError
from lorakit.methods import get_method
from lorakit.schema import closest, schema_errors
from lorakit.yamlmarks import KeyPath, MarkedDocument, load_marked_yaml

__all__ = ["Manifest", "MethodSpec", "Rule", "SourceSpec", "load_manifest"]

_METHOD_KEYS = ("method", "rank", "density", "majority_sign_method")


@dataclass(frozen=True)
class SourceSpec:
    """One source adapter as the manifest names it; ``path`` is absolute."""

    name: str
    path: Path
    weight: float
    key_path: KeyPath


@dataclass(frozen=True)
class MethodSpec:
    """A merge method with its rank and extra parameters, defaults filled in.

    ``origin`` says which part of the manifest chose it (``merge``, ``merge.rules[0]``,
    ``merge.projections.q_proj``) and ``key_path`` where that part sits in the file.
    """

    method: str
    rank: int | None
    params: tuple[tuple[str, Any], ...]
    origin: str
    key_path: KeyPath = field(compare=False)

    @property
    def key(self) -> tuple[Any, ...]:
        """What makes two specs merge alike, for grouping modules."""
        return (self.method, self.rank, self.params)

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {"method": self.method}
        if self.rank is not None:
            result["rank"] = self.rank
        result.update(self.params)
        return result


@dataclass(frozen=True)
class Rule:
    """A per-module rule: a glob on the module path, an optional inclusive layer range, a method."""

    match: str
    layers: tuple[int, int] | None
    spec: MethodSpec


@dataclass(frozen=True)
class Manifest:
    """A validated manifest. Paths are absolute; ``document`` keeps positions for later errors."""

    path: Path
    sha256: str
    name: str
    description: str | None
    sources: tuple[SourceSpec, ...]
    default: MethodSpec
    include: tuple[str, ...] | None
    rules: tuple[Rule, ...]
    projections: tuple[tuple[str, MethodSpec], ...]
    seeds: tuple[int, ...]
    output_path: Path
    output_dtype: str
    data: dict[str, Any] = field(compare=False, repr=False)
    document: MarkedDocument = field(compare=False, repr=False)
    modules_to_save: str | None = None
    """Name of the source whose modules_to_save weights are copied into the output."""

    def where(self, key_path: KeyPath) -> str:
        """Format ``FILE:LINE:COL`` for a key path of this manifest."""
        return self.document.where(key_path)

    def specs(self) -> list[MethodSpec]:
        """Every method spec the manifest can choose: the default, the rules, the overrides."""
        return [self.default] + [rule.spec for rule in self.rules] + [spec for _, spec in self.projections]

    def needs_seed(self) -> bool:
        return any(get_method(spec.method).uses_seed for spec in self.specs())

    def output_seeds(self) -> tuple[int | None, ...]:
        """The seeds that get an output folder: every seed when a method draws, else one output."""
        if self.needs_seed():
            return self.seeds
        return (None,)

    def normalised(self) -> dict[str, Any]:
        """The manifest with defaults filled in and paths as written, for the provenance record."""
        merge: dict[str, Any] = self.default.to_dict()
        if self.include is not None:
            merge["include"] = list(self.include)
        if self.rules:
            merge["rules"] = [
                {"match": rule.match, **({"layers": list(rule.layers)} if rule.layers else {}), **rule.spec.to_dict()}
                for rule in self.rules
            ]
        if self.projections:
            merge["projections"] = {name: spec.to_dict() for name, spec in self.projections}
        if self.modules_to_save is not None:
            merge["modules_to_save"] = {"source": self.modules_to_save}
        result: dict[str, Any] = {"version": 1, "name": self.name}
        if self.description is not None:
            result["description"] = self.description
        result["sources"] = [
            {"path": self.data["sources"][index]["path"], "name": source.name, "weight": source.weight}
            for index, source in enumerate(self.sources)
        ]
        result["merge"] = merge
        if self.seeds:
            result["seeds"] = list(self.seeds)
        result["output"] = {"path": self.data["output"]["path"], "dtype": self.output_dtype}
        return result


def _read_text(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise OutputError(f"{path}: manifest not found") from None
    except IsADirectoryError:
        raise OutputError(f"{path}: is a folder; pass a manifest file (.yaml)") from None
    except OSError as error:
        raise OutputError(f"{path}: cannot read the manifest: {error.strerror or error}") from error


def _method_spec(
    settings: dict[str, Any], defaults: dict[str, Any], origin: str, key_path: KeyPath, errors: list[str], document: MarkedDocument
) -> MethodSpec:
    """Build a spec from one settings mapping, taking the rank and parameters it omits from ``defaults``."""
    name = settings["method"]
    method = get_method(name)

    # merge-level keys double as defaults for rules and overrides, so load_manifest checks them
    # against every chosen method instead.
    if origin != "merge":
        for key in _METHOD_KEYS[2:]:
            if key in settings and key not in method.parameters:
                accepted = ", ".join(method.parameters) or "no extra parameters"
                errors.append(
                    f"{document.where_key(key_path + (key,))}: method {name!r} takes no {key!r} (it takes {accepted}); remove it"
                )
        if "rank" in settings and not method.takes_rank:
            errors.append(
                f"{document.where_key(key_path + ('rank',))}: method {name!r} takes no rank (its output rank follows from "
                "the sources); remove it"
            )

    rank = settings.get("rank", defaults.get("rank")) if method.takes_rank else None
    if method.takes_rank and rank is None:
        errors.append(f"{document.where(key_path + ('method',))}: method {name!r} needs a rank; set merge.rank or rank here")
    params = []
    for key, parameter in method.parameters.items():
        value = settings.get(key, defaults.get(key, parameter.default))
        if value is None:
            errors.append(f"{document.where(key_path + ('method',))}: method {name!r} needs {key!r} ({parameter.help}); set it")
        params.append((key, value))
    return MethodSpec(
        method=name, rank=int(rank) if rank is not None else None, params=tuple(params), origin=origin, key_path=key_path
    )


def _resolve(folder: Path, text: str, where: str, errors: list[str]) -> Path:
    """Resolve a path written in the manifest against the manifest's folder."""
    if "\0" in text:
        errors.append(f"{where}: the path {text!r} contains a NUL character, which no file name can hold; remove it")
        text = text.replace("\0", "")
    try:
        return (folder / text).resolve()
    except (RuntimeError, OSError) as error:
        # pathlib raises RuntimeError for a symlink loop (Python 3.11), OSError (ELOOP) in later versions.
        errors.append(f"{where}: cannot resolve the path {text!r} ({error}); fix the symbolic links on it")
        return folder / text


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def load_manifest(path: str | Path) -> Manifest:
    """Read, validate and normalise a manifest file.

    Raises:
        ManifestError: with every problem found, each as ``FILE:LINE:COL: message``.
        OutputError: when the file cannot be read.
    """
    path = Path(path)
    raw = _read_text(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ManifestError(f"{path}:1:1: the manifest is not UTF-8 text ({error.reason} at byte {error.start})") from None
    document = load_marked_yaml(path, text)
    data = document.data
    if not isinstance(data, dict):
        raise ManifestError(f"{path}:1:1: a manifest is a mapping with the keys version, sources, merge and output")

    found = schema_errors(data)
    if found:
        located = [
            (document.where_key(key_path) if at_key else document.where(key_path), message)
            for key_path, message, at_key in found
        ]
        located.sort(key=lambda item: _position(item[0]))
        raise ManifestError([f"{where}: {message}" for where, message in located])

    errors: list[str] = []
    folder = path.resolve().parent

    sources = []
    names: dict[str, int] = {}
    for index, entry in enumerate(data["sources"]):
        source_path = _resolve(folder, entry["path"], document.where(("sources", index, "path")), errors)
        name = entry.get("name", source_path.name)
        key_path = ("sources", index)
        if name in names:
            errors.append(
                f"{document.where(key_path + ('name',) if 'name' in entry else key_path + ('path',))}: source name "
                f"{name!r} is used by sources[{names[name]}] too; give each source a unique name"
            )
        names.setdefault(name, index)
        weight = float(entry.get("weight", 1.0))
        if not math.isfinite(weight):
            errors.append(f"{document.where(key_path + ('weight',))}: weight must be a finite number, got {weight}")
        sources.append(SourceSpec(name=name, path=source_path, weight=weight, key_path=key_path))

    merge = data["merge"]
    defaults = {key: merge[key] for key in _METHOD_KEYS if key in merge and key != "method"}
    default = _method_spec(merge, defaults, "merge", ("merge",), errors, document)

    rules = []
    for index, entry in enumerate(merge.get("rules", [])):
        key_path = ("merge", "rules", index)
        spec = _method_spec(entry, defaults, f"merge.rules[{index}]", key_path, errors, document)
        layers = tuple(entry["layers"]) if "layers" in entry else None
        if layers and layers[0] > layers[1]:
            errors.append(f"{document.where(key_path + ('layers',))}: layers [{layers[0]}, {layers[1]}] is empty; write [first, last]")
        rules.append(Rule(match=entry["match"], layers=layers, spec=spec))

    projections = []
    for name, entry in (merge.get("projections") or {}).items():
        settings = {"method": entry} if isinstance(entry, str) else entry
        key_path = ("merge", "projections", name)
        if not isinstance(name, str):
            errors.append(f"{document.where_key(key_path)}: projection name {name!r} is not text; name a projection such as q_proj")
        projections.append((name, _method_spec(settings, defaults, f"merge.projections.{name}", key_path, errors, document)))

    modules_to_save = merge.get("modules_to_save", {}).get("source")
    if modules_to_save is not None and modules_to_save not in names:
        errors.append(
            f"{document.where(('merge', 'modules_to_save', 'source'))}: merge.modules_to_save.source names no source: "
            f"{modules_to_save!r}{closest(modules_to_save, names)}; sources: {', '.join(names)}"
        )

    seeds = tuple(data.get("seeds", ()))
    chosen = [default] + [rule.spec for rule in rules] + [spec for _, spec in projections]
    methods = [get_method(spec.method) for spec in chosen]
    for key in _METHOD_KEYS[1:]:
        takes = [method.takes_rank if key == "rank" else key in method.parameters for method in methods]
        if key in merge and not any(takes):
            names = ", ".join(sorted({method.name for method in methods}))
            errors.append(f"{document.where_key(('merge', key))}: merge.{key} is set but no method this manifest uses ({names}) takes it; remove it")
    drawing = [spec for spec in chosen if get_method(spec.method).uses_seed]
    if drawing and not seeds:
        errors.append(
            f"{document.where(drawing[0].key_path + ('method',))}: {drawing[0].origin} uses {drawing[0].method!r}, which draws at "
            "random; add a top-level 'seeds' list such as [100, 200]"
        )
    if any(spec.method == "soups" for spec in chosen) and math.fsum(source.weight for source in sources) == 0:
        errors.append(f"{document.where(('sources',))}: soups divides by the sum of the source weights, which is 0; change a weight")

    output = data["output"]
    output_where = document.where(("output", "path"))
    output_path = _resolve(folder, output["path"], output_where, errors)
    if _is_within(output_path, folder) or _is_within(folder, output_path):
        errors.append(
            f"{output_where}: output path {output_path} overlaps the manifest's folder {folder}; write outputs "
            "outside it (for example ../output/NAME) so recipes and weights stay apart"
        )
    for source in sources:
        if _is_within(output_path, source.path) or _is_within(source.path, output_path):
            errors.append(
                f"{output_where}: output path {output_path} overlaps source {source.name!r} at {source.path}; "
                "choose an output folder outside every source"
            )

    if errors:
        raise ManifestError(errors)

    default_name = path.name.removesuffix(".yaml").removesuffix(".yml")
    return Manifest(
        path=path,
        sha256=hashlib.sha256(raw).hexdigest(),
        name=data.get("name", default_name),
        description=data.get("description"),
        sources=tuple(sources),
        default=default,
        include=tuple(merge["include"]) if "include" in merge else None,
        rules=tuple(rules),
        projections=tuple(projections),
        seeds=seeds,
        output_path=output_path,
        output_dtype=output.get("dtype", "source"),
        data=data,
        document=document,
        modules_to_save=modules_to_save,
    )


def _position(where: str) -> tuple[int, int]:
    line, column = where.rsplit(":", 2)[1:]
    return int(line), int(column)
