"""Compiling a manifest into an execution plan, without reading a tensor.

The plan opens each source's config and tensor index (the safetensors header), discovers the
modules, picks each module's method (rules first, then ``merge.projections``, then ``merge``),
and groups modules that merge alike: same projection, method, shapes, ranks, scales and stored
dtypes. A group runs as one batched tensor operation over its layers, split into batches of at
most ``batch_bytes`` of float32 input.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from lorakit.adapter import Adapter, LoraModule, open_adapter
from lorakit.errors import AdapterError, LorakitError, ManifestError, OutputError
from lorakit.manifest import Manifest, MethodSpec, SourceSpec
from lorakit.methods import get_method
from lorakit.schema import closest
from lorakit.serving import warn_unservable_ranks

__all__ = ["Batch", "ModuleGroup", "Plan", "SavedModules", "build_plan", "default_batch_bytes", "natural_key", "resolve_device"]

logger = logging.getLogger(__name__)

# Upper bounds on the float32 working bytes of one batch: the stacked factors, plus the dense
# deltas of the methods that form them. A larger group is split by layers, down to one module.
# On a CPU the fixed cost of a batch is a few Python calls, and smaller batches keep the reused
# buffers small and partly in cache. 32 MiB batches took 3-19% less CPU time than 256 MiB ones
# in benchmarks/ on Llama-2-7B shapes. On CUDA each batch also pays kernel launches and three
# synchronisations, which larger batches amortise.
CPU_BATCH_BYTES = 32 * 2**20
CUDA_BATCH_BYTES = 256 * 2**20

# Each factor's slot in the staging buffer starts at a multiple of this many bytes, so that every
# dtype view of the byte buffer is aligned.
STAGING_ALIGNMENT = 64

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def natural_key(text: str) -> tuple:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


def resolve_device(device: str) -> torch.device:
    """Resolve ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        LorakitError: for an unknown or unavailable device, naming the ones that exist.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if re.fullmatch(r"cuda(:\d+)?", device):
        if not torch.cuda.is_available():
            raise LorakitError(f"device {device!r} requested but CUDA is not available; use --device cpu or auto")
        resolved = torch.device(device)
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise LorakitError(f"device {device!r} does not exist; this machine has {torch.cuda.device_count()} CUDA device(s)")
        return resolved
    raise LorakitError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")


@dataclass(frozen=True)
class ModuleGroup:
    """Modules of one projection that merge alike, in natural module order.

    Shapes: each source's A is (r_i, *a_tail) and B is (out_features, r_i, *b_tail), where a_tail
    is (in_features,) or (in_channels, kh, kw) and b_tail holds a convolution's (1, 1). Source i
    stores both factors of every module in the group as ``source_dtypes[i]``.
    """

    projection: str
    kind: str
    spec: MethodSpec
    module_paths: tuple[str, ...]
    source_ranks: tuple[int, ...]
    source_scales: tuple[float, ...]
    a_tail: tuple[int, ...]
    out_features: int
    b_tail: tuple[int, ...]
    output_rank: int
    output_scale: float
    bytes_read: int
    source_dtypes: tuple[torch.dtype, ...]

    @property
    def in_size(self) -> int:
        """n: the flattened size of one row of A."""
        return math.prod(self.a_tail)

    def output_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of the merged A and B of one module."""
        return (self.output_rank, *self.a_tail), (self.out_features, self.output_rank, *self.b_tail)

    def output_elements(self) -> int:
        """Elements written per output folder for the whole group."""
        return len(self.module_paths) * self.output_rank * (self.in_size + self.out_features)

    def dense_bytes(self) -> int:
        """Bytes per module of the float32 (out, in) deltas the method forms; 0 for factor methods."""
        buffers = get_method(self.spec.method).dense_buffers(len(self.source_ranks))
        return 4 * buffers * self.out_features * self.in_size

    def float32_input_bytes(self, count: int = 1) -> int:
        """Bytes of every source's A and B of ``count`` modules in float32: 4 · Σ r_i · (n + m) · count."""
        return 4 * sum(self.source_ranks) * (self.in_size + self.out_features) * count

    def staged_bytes(self, count: int = 1) -> int:
        """Bytes of the staging buffer for ``count`` modules: every factor as stored, each slot aligned."""
        total = 0
        for rank, dtype in zip(self.source_ranks, self.source_dtypes):
            for elements in (rank * self.in_size, self.out_features * rank):
                total += _aligned(count * elements * dtype.itemsize)
        return total

    def output_bytes(self, dtype: torch.dtype, count: int = 1) -> int:
        """Bytes of the merged A and B of ``count`` modules in ``dtype``, each factor's slot aligned."""
        return sum(
            _aligned(count * elements * dtype.itemsize)
            for elements in (self.output_rank * self.in_size, self.out_features * self.output_rank)
        )

    def batch_size(self, batch_bytes: int) -> int:
        """Return the modules per batch: as many as fit in ``batch_bytes`` of float32 working memory.

        A module's working memory is its stacked float32 factors plus ``dense_bytes``. A single
        module larger than ``batch_bytes`` still forms a batch of its own.
        """
        per_module = self.float32_input_bytes() + self.dense_bytes()
        return min(len(self.module_paths), max(1, batch_bytes // max(per_module, 1)))

    def to_dict(self) -> dict[str, Any]:
        a_shape, b_shape = self.output_shapes()
        return {
            "projection": self.projection,
            "kind": self.kind,
            "method": self.spec.to_dict(),
            "chosen_by": self.spec.origin,
            "modules": list(self.module_paths),
            "source_ranks": list(self.source_ranks),
            "source_scales": list(self.source_scales),
            "output_rank": self.output_rank,
            "output_scale": self.output_scale,
            "lora_A_shape": list(a_shape),
            "lora_B_shape": list(b_shape),
            "source_dtypes": [str(dtype).removeprefix("torch.") for dtype in self.source_dtypes],
            "bytes_read": self.bytes_read,
        }


def _aligned(size: int) -> int:
    return -(-size // STAGING_ALIGNMENT) * STAGING_ALIGNMENT


@dataclass(frozen=True)
class Batch:
    """Modules of one group that merge in one tensor operation, as indices into ``group.module_paths``."""

    group: ModuleGroup
    indices: tuple[int, ...]

    @property
    def module_paths(self) -> tuple[str, ...]:
        return tuple(self.group.module_paths[index] for index in self.indices)


@dataclass(frozen=True)
class SavedModules:
    """Full weights of the modules in modules_to_save, copied unchanged from one source.

    ``tensors`` lists (key, shape, dtype) of every copied tensor, as stored in the source.
    """

    source: int
    names: tuple[str, ...]
    tensors: tuple[tuple[str, tuple[int, ...], torch.dtype], ...]

    @property
    def nbytes(self) -> int:
        return sum(dtype.itemsize * math.prod(shape) for _, shape, dtype in self.tensors)


@dataclass(frozen=True)
class Plan:
    """Everything ``run`` will do, computed from the manifest and the adapters' headers."""

    manifest: Manifest
    adapters: tuple[Adapter, ...]
    groups: tuple[ModuleGroup, ...]
    excluded: tuple[str, ...]
    output_dtype: torch.dtype
    outputs: tuple[tuple[int | None, Path], ...]
    device: torch.device
    batch_bytes: int = CPU_BATCH_BYTES
    modules_to_save: SavedModules | None = None
    # (key, shape, dtype) of the base embedding weights every source saved alike; copied unchanged.
    base_layers: tuple[tuple[str, tuple[int, ...], torch.dtype], ...] = ()

    @property
    def saved_bytes(self) -> int:
        return self.modules_to_save.nbytes if self.modules_to_save is not None else 0

    @property
    def base_layer_bytes(self) -> int:
        """Bytes of one copy of the base embedding weights."""
        return sum(dtype.itemsize * math.prod(shape) for _, shape, dtype in self.base_layers)

    @property
    def bytes_read(self) -> int:
        # Every source's copy of the base embedding is read, to check that they are equal.
        base_layers = len(self.adapters) * self.base_layer_bytes
        return sum(group.bytes_read for group in self.groups) + self.saved_bytes + base_layers

    @property
    def bytes_written(self) -> int:
        """Tensor bytes written over every output folder."""
        itemsize = self.output_dtype.itemsize
        copied = self.saved_bytes + self.base_layer_bytes
        return len(self.outputs) * (itemsize * sum(group.output_elements() for group in self.groups) + copied)

    def batch_sizes(self) -> list[tuple[ModuleGroup, int]]:
        """Return (group, module count) of the largest batch of every group."""
        return [(group, group.batch_size(self.batch_bytes)) for group in self.groups]

    def batches(self) -> list[Batch]:
        """Return every batch of every group, in the order ``run`` merges them.

        Each group's modules are taken in the order of their output tensor names, which is the
        order of the output file (safetensors sorts tensors by name: layers.0, layers.1,
        layers.10, …), and cut into batches of ``batch_size`` modules. The batches of all groups
        are then ordered by their first name. The output file so fills from the front, which lets
        the writer hash it while the merge runs instead of reading it back at the end.
        """

        def name(path: str) -> str:
            return self.adapters[0].modules[path].a_key

        batches = []
        for group in self.groups:
            order = sorted(range(len(group.module_paths)), key=lambda index: name(group.module_paths[index]))
            size = group.batch_size(self.batch_bytes)
            batches += [Batch(group, tuple(order[start : start + size])) for start in range(0, len(order), size)]
        batches.sort(key=lambda batch: name(batch.group.module_paths[batch.indices[0]]))
        return batches

    def staging_bytes(self) -> int:
        """Bytes of the host buffer that every batch's stored factors are read into."""
        return max(group.staged_bytes(count) for group, count in self.batch_sizes())

    def converted_bytes(self) -> int:
        """Bytes of the CPU buffer that inputs stored in another dtype than float32 are converted into."""
        converted = 0
        for group, count in self.batch_sizes():
            size = sum(
                _aligned(4 * count * elements)
                for rank, dtype in zip(group.source_ranks, group.source_dtypes)
                if dtype != torch.float32
                for elements in (rank * group.in_size, group.out_features * rank)
            )
            converted = max(converted, size)
        return converted

    def scratch_bytes(self) -> int:
        """Bytes of the CPU buffer methods may carve temporaries from: the largest batch's float32 input."""
        return max(group.float32_input_bytes(count) for group, count in self.batch_sizes())

    def result_bytes(self) -> int:
        """Bytes of one host buffer the methods write float32 results into; 0 off the CPU."""
        if self.device.type != "cpu":
            return 0
        return max(group.output_bytes(torch.float32, count) for group, count in self.batch_sizes())

    def host_output_bytes(self) -> int:
        """Bytes of one host buffer the results are cast or copied into; 0 when none is needed.

        On the CPU with float32 output the results are written from the result buffer.
        """
        if self.device.type == "cpu" and self.output_dtype == torch.float32:
            return 0
        return max(group.output_bytes(self.output_dtype, count) for group, count in self.batch_sizes())

    def dense_batch_bytes(self) -> int:
        """Bytes of the float32 (out, in) deltas the largest batch forms; 0 when no method forms any."""
        return max(count * group.dense_bytes() for group, count in self.batch_sizes())

    def peak_memory_estimate(self) -> int:
        """Estimate the peak bytes of host tensor memory; the interpreter and libraries come on top.

        The sum of the reused buffers, each at the size of the largest batch: staging and, on the
        CPU, converted inputs, scratch and results. The buffer the writer thread reads from (the
        results on the CPU with float32 output, else the cast output) is counted twice. On the CPU
        the dense deltas of the methods that form them (``dense_batch_bytes``) are added, and so is
        a source that must be loaded whole (a ``.bin`` pickle in PyTorch's legacy format). Other
        temporaries of a method are not counted.
        """
        result = self.result_bytes()
        output = self.host_output_bytes()
        doubled = 2 * output + result if output else 2 * result
        peak = self.staging_bytes() + doubled + sum(adapter.resident_bytes() for adapter in self.adapters)
        if self.device.type == "cpu":
            peak += self.converted_bytes() + self.scratch_bytes() + self.dense_batch_bytes()
        return peak

    def device_memory_estimate(self) -> int:
        """Estimate the peak bytes of device memory for a CUDA plan; 0 on the CPU.

        The largest batch's staged bytes, their float32 copies, one temporary as large as those,
        the dense deltas of the methods that form them, the float32 result and its cast.
        """
        if self.device.type == "cpu":
            return 0
        peak = 0
        for group, count in self.batch_sizes():
            size = (
                group.staged_bytes(count)
                + 2 * group.float32_input_bytes(count)
                + count * group.dense_bytes()
                + group.output_bytes(torch.float32, count)
                + group.output_bytes(self.output_dtype, count)
            )
            peak = max(peak, size)
        return peak

    def modules_to_save_record(self) -> dict[str, Any] | None:
        """Return the copied modules_to_save weights as JSON-ready data: source, module names, tensor keys."""
        if self.modules_to_save is None:
            return None
        return {
            "source": self.adapters[self.modules_to_save.source].name,
            "modules": list(self.modules_to_save.names),
            "tensors": [key for key, _, _ in self.modules_to_save.tensors],
        }

    def to_dict(self) -> dict[str, Any]:
        """The plan as plain JSON-ready data."""
        return {
            "manifest": str(self.manifest.path),
            "name": self.manifest.name,
            "device": str(self.device),
            "output_dtype": str(self.output_dtype).removeprefix("torch."),
            "outputs": [{"seed": seed, "path": str(path)} for seed, path in self.outputs],
            "sources": [
                {
                    "name": adapter.name,
                    "path": str(adapter.folder),
                    "weights": adapter.weights_path.name,
                    "modules": len(adapter.modules),
                    "weight": source.weight,
                }
                for adapter, source in zip(self.adapters, self.manifest.sources)
            ],
            "excluded_projections": list(self.excluded),
            "modules_to_save": self.modules_to_save_record(),
            "base_layers": [key for key, _, _ in self.base_layers],
            "groups": [group.to_dict() for group in self.groups],
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "peak_memory_estimate": self.peak_memory_estimate(),
            "device_memory_estimate": self.device_memory_estimate(),
        }


def _open_sources(manifest: Manifest) -> list[Adapter]:
    """Open every source, reporting all that fail; the error's class follows the worst exit code."""
    adapters, errors, worst = [], [], None
    for source in manifest.sources:
        try:
            adapters.append(open_adapter(source.path, source.name))
        except LorakitError as error:
            errors.append(f"{_source_where(manifest, source)}: {error}")
            worst = error if worst is None or error.exit_code > worst.exit_code else worst
    if worst is not None:
        raise (OutputError if isinstance(worst, OutputError) else AdapterError)("\n".join(errors))
    return adapters


def _source_where(manifest: Manifest, source: SourceSpec) -> str:
    """Format ``FILE:LINE:COL: source 'name'`` for the manifest line that names ``source``."""
    return f"{manifest.where(source.key_path + ('path',))}: source {source.name!r}"


def _saved_modules(manifest: Manifest, adapters: list[Adapter]) -> SavedModules | None:
    """Pick the source whose modules_to_save weights the output copies, as merge.modules_to_save names it."""
    holders = [(source, adapter) for source, adapter in zip(manifest.sources, adapters) if adapter.saved_tensors]
    if manifest.modules_to_save is None:
        errors = [
            f"{_source_where(manifest, source)}: {adapter.weights_path}: has "
            f"{len(adapter.saved_tensors)} full-weight tensor(s) of modules_to_save, first "
            f"{next(iter(adapter.saved_tensors))!r}, which cannot be merged as low-rank factors; copy them unchanged "
            f"from one source with merge.modules_to_save: {{source: {adapter.name}}}"
            for source, adapter in holders
        ]
        if errors:
            raise AdapterError("\n".join(errors))
        return None

    index = [adapter.name for adapter in adapters].index(manifest.modules_to_save)
    chosen = adapters[index]
    if not chosen.saved_tensors:
        raise ManifestError(
            f"{manifest.where(('merge', 'modules_to_save', 'source'))}: merge.modules_to_save takes the "
            f"modules_to_save tensors of source {chosen.name!r}, but it has none; name a source whose "
            "adapter_config.json lists modules_to_save, or remove merge.modules_to_save"
        )
    for _, adapter in holders:
        if adapter is not chosen:
            logger.warning(
                "source %r: its %d modules_to_save tensor(s) are left out; the output copies those of source %r",
                adapter.name,
                len(adapter.saved_tensors),
                chosen.name,
            )
    tensors = tuple((key, shape, dtype) for key, (shape, dtype) in sorted(chosen.saved_tensors.items()))
    return SavedModules(source=index, names=tuple(chosen.config["modules_to_save"]), tensors=tensors)


def _base_layers(
    manifest: Manifest, adapters: list[Adapter], table: dict[str, list[LoraModule]]
) -> tuple[tuple[str, tuple[int, ...], torch.dtype], ...]:
    """Return (key, shape, dtype) of the base embedding weights the output copies, checking that every source has them.

    PEFT saves an adapted embedding's base weights beside its factors. They are the base model's
    own weights unless the vocabulary was resized, so the output copies them from the first
    source, and ``run`` checks that every source's copy is equal. Modules left out of the merge
    are skipped.
    """
    first = adapters[0]
    expected = {path: spec for path, spec in first.base_layers.items() if path in table}
    for source, adapter in zip(manifest.sources, adapters):
        theirs = {path: spec for path, spec in adapter.base_layers.items() if path in table}
        differing = sorted(path for path in set(theirs) | set(expected) if theirs.get(path) != expected.get(path))
        if differing:
            raise AdapterError(
                f"{_source_where(manifest, source)}: {adapter.weights_path}: the base weights PEFT saved for "
                f"embedding {differing[0]!r} are missing or differ in key, shape or dtype from source {first.name!r}; "
                "save every source with the same save_embedding_layers setting from the same base model"
            )
    return tuple(expected[path] for path in sorted(expected, key=natural_key))


def warn_oversized_ranks(groups: Sequence[ModuleGroup]) -> None:
    """Log a warning for every group whose output rank buys nothing over a smaller output.

    Two cases. ``random`` with K > Σ r_i draws only approximate the average that ``block`` gives
    exactly at K = Σ r_i when the sources' ranks are equal. Any method with K · (m + n) ≥ m · n
    writes factors that hold at least as many numbers as the dense m × n delta they encode.
    """
    warned = set()
    for group in groups:
        # Groups of one projection differ only by layer or rule, so one warning per case is enough.
        if (group.projection, group.spec.method, group.output_rank) in warned:
            continue
        warned.add((group.projection, group.spec.method, group.output_rank))

        total = sum(group.source_ranks)
        if group.spec.method == "random" and group.output_rank > total:
            logger.warning(
                "%s: random rank %d exceeds the %d components of the sources; its draws only approach the "
                "average that block with rank %d gives exactly when the sources' ranks are equal",
                group.projection,
                group.output_rank,
                total,
                total,
            )
        dense = group.out_features * group.in_size
        if group.output_rank * (group.out_features + group.in_size) >= dense:
            logger.warning(
                "%s: rank %d factors (%d numbers per module) are at least as large as the dense %d x %d delta; "
                "a rank below %d stores less",
                group.projection,
                group.output_rank,
                group.output_rank * (group.out_features + group.in_size),
                group.out_features,
                group.in_size,
                math.ceil(dense / (group.out_features + group.in_size)),
            )


def _choose(manifest: Manifest, module: LoraModule, overrides: dict[str, MethodSpec], used_rules: set[int]) -> MethodSpec:
    for index, rule in enumerate(manifest.rules):
        if not fnmatch.fnmatchcase(module.path, rule.match):
            continue
        if rule.layers is not None and (module.layer is None or not rule.layers[0] <= module.layer <= rule.layers[1]):
            continue
        used_rules.add(index)
        return rule.spec
    return overrides.get(module.projection, manifest.default)


def _check_names(manifest: Manifest, projections: list[str]) -> list[str]:
    errors = []
    if manifest.include is not None:
        for index, name in enumerate(manifest.include):
            if name not in projections:
                errors.append(
                    f"{manifest.where(('merge', 'include', index))}: no source has a projection named {name!r}"
                    f"{closest(name, projections)}; projections in the sources: {', '.join(projections)}"
                )
    for name, spec in manifest.projections:
        # The name is the problem here, so point at the key rather than at the method it maps to.
        where = manifest.document.where_key(spec.key_path)
        if name not in projections:
            errors.append(
                f"{where}: no source has a projection named {name!r}{closest(name, projections)}; "
                f"projections in the sources: {', '.join(projections)}"
            )
        elif manifest.include is not None and name not in manifest.include:
            errors.append(f"{where}: projection {name!r} is not in merge.include; add it there or remove this override")
    return errors


def _rule_hint(match: str, projections: list[str]) -> str:
    """Name the closest projection when a rule's last path component is a literal, unknown name."""
    last = match.rsplit(".", 1)[-1]
    if not last or any(character in last for character in "*?[]") or last in projections:
        return ""
    return f": no source has a projection named {last!r}{closest(last, projections)}"


def _module_table(manifest: Manifest, adapters: list[Adapter], included: set[str]) -> dict[str, list[LoraModule]]:
    """Return module path → one LoraModule per source for the included projections, checking that every source agrees.

    Modules of projections left out by ``merge.include`` are not compared, so sources may differ there.
    """

    def merged_paths(adapter: Adapter) -> set[str]:
        return {path for path, module in adapter.modules.items() if module.projection in included}

    first = adapters[0]
    first_paths = merged_paths(first)
    table: dict[str, list[LoraModule]] = {}
    for source, adapter in zip(manifest.sources[1:], adapters[1:]):
        paths = merged_paths(adapter)
        missing = sorted(first_paths - paths, key=natural_key)
        extra = sorted(paths - first_paths, key=natural_key)
        if missing or extra:
            path, owner = (missing[0], first) if missing else (extra[0], adapter)
            raise AdapterError(
                f"{_source_where(manifest, source)} adapts other modules than source {first.name!r} "
                f"({len(missing) + len(extra)} differ, such as {path!r}, adapted only by {owner.name!r}); every "
                "source must adapt the same modules, so merge adapters trained with the same target_modules, "
                f"or leave projection {owner.modules[path].projection!r} out with merge.include"
            )

    for path in sorted(first_paths, key=natural_key):
        modules = [adapter.modules[path] for adapter in adapters]
        reference = modules[0]
        for source, adapter, module in zip(manifest.sources[1:], adapters[1:], modules[1:]):
            if module.kind != reference.kind or module.a_shape[1:] != reference.a_shape[1:] or module.b_shape[0] != reference.b_shape[0] or module.b_shape[2:] != reference.b_shape[2:]:
                raise AdapterError(
                    f"{_source_where(manifest, source)}: module {path!r} has lora_A {list(module.a_shape)} / lora_B "
                    f"{list(module.b_shape)} but source {first.name!r} has {list(reference.a_shape)} / "
                    f"{list(reference.b_shape)}; the sources were trained on different base models"
                )
        table[path] = modules
    return table


def default_batch_bytes(device: torch.device) -> int:
    """Return the batch size bound for ``device``, in bytes of float32 input."""
    return CPU_BATCH_BYTES if device.type == "cpu" else CUDA_BATCH_BYTES


def _rank_where(manifest: Manifest, spec: MethodSpec) -> str:
    """Point at the rank a spec uses, where it is written, else at its method."""
    for key_path in (spec.key_path + ("rank",), ("merge", "rank")):
        if spec.rank is not None and key_path in manifest.document.marks:
            return manifest.where(key_path)
    return manifest.where(spec.key_path + ("method",))


def build_plan(manifest: Manifest, device: str = "auto", batch_bytes: int | None = None) -> Plan:
    """Compile ``manifest`` into a plan, reading only configs and tensor headers.

    ``batch_bytes`` bounds the float32 input bytes of one batch; None takes ``default_batch_bytes``.

    Raises:
        ManifestError: for names or ranks the sources cannot satisfy, with ``FILE:LINE:COL``.
        AdapterError: for sources that cannot be merged together.
        LorakitError: for an unknown or unavailable device.
    """
    resolved_device = resolve_device(device)
    adapters = _open_sources(manifest)
    saved_modules = _saved_modules(manifest, adapters)
    projections = sorted({module.projection for adapter in adapters for module in adapter.modules.values()})
    errors = _check_names(manifest, projections)
    if errors:
        raise ManifestError(errors)
    included = set(manifest.include) if manifest.include is not None else set(projections)
    excluded = tuple(name for name in projections if name not in included)
    table = _module_table(manifest, adapters, included)

    overrides = dict(manifest.projections)
    used_rules: set[int] = set()
    grouped: dict[tuple, list[str]] = {}
    for path, modules in table.items():
        reference = modules[0]
        if reference.projection not in included:
            continue
        spec = _choose(manifest, reference, overrides, used_rules)
        key = (
            reference.projection,
            spec,
            reference.kind,
            tuple(module.rank for module in modules),
            tuple(module.scale for module in modules),
            reference.a_shape[1:],
            reference.b_shape[0],
            reference.b_shape[2:],
            tuple(module.dtype for module in modules),
        )
        grouped.setdefault(key, []).append(path)

    errors = []
    for index, rule in enumerate(manifest.rules):
        if index not in used_rules:
            errors.append(
                f"{manifest.where(rule.spec.key_path + ('match',))}: rule {rule.match!r}"
                f"{f' with layers {list(rule.layers)}' if rule.layers else ''} matches no included module "
                f"(or an earlier rule takes them all){_rule_hint(rule.match, projections)}; fix the pattern or remove the rule"
            )

    groups = []
    # One message per problem, listing every projection it hits, instead of one line per projection.
    rank_errors: dict[tuple[str, str], list[str]] = {}
    for (projection, spec, kind, ranks, scales, a_tail, out_features, b_tail, dtypes), paths in grouped.items():
        method = get_method(spec.method)
        try:
            output_rank = method.output_rank(ranks, spec.rank)
        except ValueError as error:
            projections_hit = rank_errors.setdefault((_rank_where(manifest, spec), f"({spec.origin}): {error}"), [])
            if projection not in projections_hit:
                projections_hit.append(projection)
            continue
        limit = method.rank_limit(ranks, out_features, math.prod(a_tail))
        if limit is not None and output_rank > limit:
            logger.info(
                "%s (%s): %s rank %d lowered to %d, the highest rank its result can have", projection, spec.origin, method.name, output_rank, limit
            )
            output_rank = limit
        bytes_read = sum(module.nbytes for path in paths for module in table[path])
        groups.append(
            ModuleGroup(
                projection=projection,
                kind=kind,
                spec=spec,
                module_paths=tuple(paths),
                source_ranks=ranks,
                source_scales=scales,
                a_tail=a_tail,
                out_features=out_features,
                b_tail=b_tail,
                output_rank=output_rank,
                output_scale=method.output_scale(scales),
                bytes_read=bytes_read,
                source_dtypes=dtypes,
            )
        )
    errors.extend(f"{where}: {', '.join(hit)} {message}" for (where, message), hit in rank_errors.items())
    if errors:
        raise ManifestError(errors)
    if not groups:
        raise ManifestError(f"{manifest.where(('merge',))}: nothing to merge: merge.include selects no module")

    if manifest.output_dtype == "source":
        output_dtype = torch.float32 if not table else None
        for modules in table.values():
            for module in modules:
                output_dtype = module.dtype if output_dtype is None else torch.promote_types(output_dtype, module.dtype)
    else:
        output_dtype = _DTYPES[manifest.output_dtype]

    seeds = manifest.output_seeds()
    outputs = tuple(
        (seed, manifest.output_path if len(seeds) == 1 else manifest.output_path / f"seed-{seed}") for seed in seeds
    )
    if excluded:
        logger.warning("projections not in merge.include are left out of the output: %s", ", ".join(excluded))
    warn_unservable_ranks((group.projection, group.output_rank) for group in groups)
    warn_oversized_ranks(groups)
    if all(source.weight == 0 for source in manifest.sources):
        logger.warning("every source has weight 0, so every merged delta is zero; set a nonzero weight on at least one source")

    return Plan(
        manifest=manifest,
        adapters=tuple(adapters),
        groups=tuple(groups),
        excluded=excluded,
        output_dtype=output_dtype,
        outputs=outputs,
        device=resolved_device,
        batch_bytes=batch_bytes if batch_bytes is not None else default_batch_bytes(resolved_device),
        modules_to_save=saved_modules,
        base_layers=_base_layers(manifest, adapters, table),
    )
