"""Reading PEFT LoRA adapter folders lazily: config, module discovery, per-module rank and alpha.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (preferred) or
``adapter_model.bin``. Tensor keys follow PEFT's saved form::

    base_model.model.<module path>.lora_A.weight          (r, in) or (r, in, kh, kw)
    base_model.model.<module path>.lora_B.weight          (out, r) or (out, r, 1, 1)
    base_model.model.<module path>.lora_embedding_A       (r, num_embeddings)
    base_model.model.<module path>.lora_embedding_B       (embedding_dim, r)
    base_model.model.<module path>.base_layer.weight      (num_embeddings, embedding_dim), the base
                                                          embedding PEFT saves when it is adapted

Modules are discovered from these keys, so no architecture or layer count is assumed.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import stat
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from lorakit.errors import AdapterError, LorakitError, OutputError

__all__ = ["Adapter", "LoraModule", "open_adapter", "resolve_pattern"]

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"

_FACTOR_KEY = re.compile(r"^(?P<path>.+)\.(?P<factor>lora_A|lora_B)\.weight$")
_EMBEDDING_KEY = re.compile(r"^(?P<path>.+)\.(?P<factor>lora_embedding_A|lora_embedding_B)$")
_BASE_LAYER_KEY = re.compile(r"^(?P<path>.+)\.base_layer\.weight$")
_PREFIX = "base_model.model."
_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class LoraModule:
    """One adapted module of a source: where its factors are and how to scale them.

    ``path`` is the module path inside the base model (``model.layers.3.self_attn.q_proj``);
    ``scale`` is alpha / rank, or alpha / sqrt(rank) with rsLoRA.
    """

    path: str
    kind: str
    rank: int
    alpha: float
    scale: float
    a_key: str
    b_key: str
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def projection(self) -> str:
        """The last component of the module path, such as ``q_proj``."""
        return self.path.rsplit(".", 1)[-1]

    @property
    def layer(self) -> int | None:
        """The first integer component of the module path (the layer index), if any."""
        match = _LAYER_INDEX.search("." + self.path)
        return int(match.group(1)) if match else None

    @property
    def nbytes(self) -> int:
        """Bytes of both factors as stored."""
        size = torch.finfo(self.dtype).bits // 8
        return size * (math.prod(self.a_shape) + math.prod(self.b_shape))


def resolve_pattern(patterns: dict[str, Any], module_path: str, default: Any) -> Any:
    """Resolve a per-module value from PEFT's ``rank_pattern`` or ``alpha_pattern``.

    Matches like PEFT 0.21 (``peft.utils.other.get_pattern_key``): the first key ``k`` in dict
    order for which ``re.match(rf"(.*\\.)?({k})$", module_path)`` succeeds wins.
    """
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_path):
            return patterns[key]
    return default


class Adapter:
    """A source adapter folder: its config, its modules, and lazy access to its tensors.

    A safetensors file is read tensor by tensor with ``pread`` at the offsets in its header, straight
    into the caller's buffer. Reading through a memory map instead would leave every page of the
    file mapped, and counted in the resident set, until the map closed. A ``.bin`` file is a pickle:
    one in PyTorch's zip format (``torch.save``'s default since PyTorch 1.6, and what PEFT writes) is
    memory-mapped on first use, so only the tensors read are paged in. A legacy non-zip pickle has
    no random access and is loaded whole. Either stays open until ``close``, which ``run_plan``
    calls after the last group, because every group reads every source.
    """

    def __init__(
        self,
        name: str,
        folder: Path,
        config: dict[str, Any],
        weights_path: Path,
        index: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None,
        offsets: dict[str, tuple[int, int]] | None = None,
    ):
        self.name = name
        self.folder = folder
        self.config = config
        self.weights_path = weights_path
        self.modules: dict[str, LoraModule] = {}
        # key → (shape, dtype) of the full weights of the modules the config lists in modules_to_save.
        self.saved_tensors: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        # module path → (key, shape, dtype) of the base weights PEFT saves beside an adapted embedding
        # (``save_embedding_layers``), such as ``base_model.model.model.embed_tokens.base_layer.weight``.
        self.base_layers: dict[str, tuple[str, tuple[int, ...], torch.dtype]] = {}
        self.other_keys: list[str] = []
        self._index = index or {}
        self._offsets = offsets or {}
        self._fd: int | None = None
        self._state_dict: dict[str, torch.Tensor] | None = None

    @property
    def is_safetensors(self) -> bool:
        return self.weights_path.suffix == ".safetensors"

    def resident_bytes(self) -> int:
        """Return the bytes this source keeps in memory while open: a legacy ``.bin`` file's size, else 0."""
        if self.is_safetensors or zipfile.is_zipfile(self.weights_path):
            return 0
        return self.weights_path.stat().st_size

    def files(self) -> list[Path]:
        """Return the config and weights files of this adapter, config first."""
        return [self.folder / CONFIG_NAME, self.weights_path]

    def read(self, key: str) -> torch.Tensor:
        """Read one tensor by key into a new CPU tensor of its stored shape and dtype."""
        shape, dtype = self._index[key]
        out = torch.empty(shape, dtype=dtype)
        self.read_into(key, out)
        return out

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Copy tensor ``key`` into ``out``: a contiguous CPU tensor of the stored dtype and element count.

        Raises:
            AdapterError: when the file ends before the tensor does.
            OutputError: when the file cannot be read.
        """
        if not self.is_safetensors:
            out.view(-1).copy_(self._load_bin()[key].reshape(-1))
            return

        start, stop = self._offsets[key]
        if out.numel() * out.element_size() != stop - start:
            raise ValueError(f"tensor {key!r} is {stop - start} bytes, but the buffer is {out.numel() * out.element_size()} bytes")
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        try:
            if self._fd is None:
                self._fd = os.open(self.weights_path, os.O_RDONLY)
            position = start
            while view:
                count = os.preadv(self._fd, [view], position)
                if count == 0:
                    raise AdapterError(
                        f"{self.weights_path}: the file ends inside tensor {key!r}; it was truncated, re-save the adapter"
                    )
                view = view[count:]
                position += count
        except OSError as error:
            raise OutputError(f"{self.weights_path}: cannot read tensor {key!r}: {error.strerror or error}") from error

    def prefetch(self, keys: list[str]) -> None:
        """Ask the kernel to start reading these tensors into the page cache, without waiting.

        A hint only: it does nothing for ``.bin`` files, where ``posix_fadvise`` is missing
        (macOS), or when the call fails.
        """
        if not self.is_safetensors or not hasattr(os, "posix_fadvise"):
            return
        try:
            if self._fd is None:
                self._fd = os.open(self.weights_path, os.O_RDONLY)
            for key in keys:
                start, stop = self._offsets[key]
                os.posix_fadvise(self._fd, start, stop - start, os.POSIX_FADV_WILLNEED)
        except OSError as error:
            logger.debug("%s: prefetch failed: %s", self.weights_path, error)

    def close(self) -> None:
        """Close the open file and release any loaded ``.bin`` state dict."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._state_dict = None

    def _load_bin(self) -> dict[str, torch.Tensor]:
        if self._state_dict is None:
            self._state_dict = _load_bin_file(self.weights_path)
        return self._state_dict


def _load_bin_file(path: Path) -> dict[str, torch.Tensor]:
    """Load a ``.bin`` state dict, memory-mapped when it is in PyTorch's zip format."""
    # weights_only=True refuses any pickle that would construct objects other than tensors and
    # plain containers, so a hostile file cannot run code here. mmap needs the zip format, which
    # torch.save has written by default since PyTorch 1.6.
    try:
        mapped = zipfile.is_zipfile(path)
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mapped)
    except OSError as error:
        raise _read_error(path, error) from error
    except Exception as error:
        raise AdapterError(
            f"{path}: not a loadable PyTorch state dict ({_unpickling_problem(error)}); safe loading "
            "(torch.load with weights_only=True) refuses pickles that could run code, so convert the adapter to "
            "safetensors"
        ) from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterError(f"{path}: expected a dict of tensors")
    return state


def _read_error(path: Path, error: OSError) -> LorakitError:
    """Classify an error met while reading an input: a path that can never work is invalid input."""
    if error.errno in (errno.ENAMETOOLONG, errno.ELOOP):
        return AdapterError(f"{path}: {error.strerror}; check the source path in the manifest")
    if error.errno == errno.EISDIR:
        return OutputError(f"{path}: is a folder, not a file; remove it or replace it with the file PEFT saves")
    return OutputError(f"{path}: cannot read: {error.strerror or error}")


def _is_file(path: Path) -> bool:
    """Return whether ``path`` exists as a regular file.

    Raises:
        OutputError: when ``path`` is a folder, a FIFO, socket or device, or cannot be examined.
    """
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as error:
        raise _read_error(path, error) from error
    if stat.S_ISDIR(mode):
        raise _read_error(path, IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR)))
    # A FIFO or device would block the read or never end, so only regular files are read.
    if not stat.S_ISREG(mode):
        raise OutputError(f"{path}: not a regular file (a FIFO, socket or device); replace it with the adapter's file")
    return True


def _unpickling_problem(error: Exception) -> str:
    """Return the line of a torch.load error that names the cause, such as an unsupported global."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # torch 2.6+ puts the cause on a line starting "WeightsUnpickler error:", after generic advice,
    # and follows it with a sentence on how to allow the global, which a user should not do here.
    cause = next((line for line in lines if line.startswith("WeightsUnpickler error:")), lines[0] if lines else "")
    cause = cause.removeprefix("WeightsUnpickler error:").strip().split(". ")[0]
    return f"{type(error).__name__}: {cause[:200]}"


def _read_config(folder: Path) -> dict[str, Any]:
    config_path = folder / CONFIG_NAME
    try:
        mode = folder.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise AdapterError(f"{folder}: adapter folder not found; check the source path in the manifest") from None
    except OSError as error:
        raise _read_error(folder, error) from error
    if not stat.S_ISDIR(mode):
        raise AdapterError(f"{folder}: not a folder; a source path must name a PEFT adapter folder")
    if not _is_file(config_path):
        raise AdapterError(f"{config_path}: not found; a PEFT adapter folder contains adapter_config.json")
    try:
        text = config_path.read_text(encoding="utf-8")
    except OSError as error:
        raise _read_error(config_path, error) from error
    except UnicodeDecodeError as error:
        raise AdapterError(f"{config_path}: not UTF-8 text: {error}") from error
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise AdapterError(f"{config_path}:{error.lineno}:{error.colno}: invalid JSON: {error.msg}") from error
    if not isinstance(config, dict):
        raise AdapterError(f"{config_path}: expected a JSON object")
    return config


def _check_config(config_path: Path, config: dict[str, Any], mergeable_only: bool = True) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(
            f"{config_path}: peft_type is {peft_type!r}; lorakit merges LoRA adapters (peft_type \"LORA\") only"
        )
    if mergeable_only and config.get("use_dora"):
        raise AdapterError(
            f"{config_path}: use_dora is true; merging DoRA adapters needs the base weights, which lorakit never loads"
        )
    if mergeable_only and config.get("lora_bias"):
        raise AdapterError(f"{config_path}: lora_bias is true; bias terms of lora_B cannot be merged as low-rank factors")
    _check_value(config_path, "r", config.get("r"), integer=True)
    _check_value(config_path, "lora_alpha", config.get("lora_alpha"), integer=False)
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise AdapterError(f"{config_path}: {key} must be a mapping of module pattern to value")
        for pattern, value in patterns.items():
            try:
                re.compile(pattern)
            except re.error as error:
                raise AdapterError(f"{config_path}: {key} key {pattern!r} is not a valid regular expression ({error})") from None
            _check_value(config_path, f"{key}[{pattern!r}]", value, integer=key == "rank_pattern")
    saved = config.get("modules_to_save")
    if saved is not None and (not isinstance(saved, list) or not all(isinstance(name, str) and name for name in saved)):
        raise AdapterError(f"{config_path}: modules_to_save must be a list of module names, got {saved!r}")


def _check_value(config_path: Path, key: str, value: Any, integer: bool) -> None:
    """Raise unless ``value`` is a positive integer (``integer``) or a positive finite number."""
    kind = "integer" if integer else "number"
    valid = isinstance(value, int) if integer else isinstance(value, (int, float)) and math.isfinite(value)
    if isinstance(value, bool) or not valid or value <= 0:
        raise AdapterError(f"{config_path}: {key} must be a positive {kind}, got {value!r}")


def _weights_path(folder: Path) -> Path:
    safetensors_path = folder / SAFETENSORS_NAME
    bin_path = folder / BIN_NAME
    if _is_file(safetensors_path):
        if _is_file(bin_path):
            logger.info("%s: both %s and %s exist; reading %s", folder, SAFETENSORS_NAME, BIN_NAME, SAFETENSORS_NAME)
        return safetensors_path
    if _is_file(bin_path):
        return bin_path
    raise AdapterError(f"{folder}: no {SAFETENSORS_NAME} or {BIN_NAME}; save the adapter with PEFT's save_pretrained")


def _tensor_index(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Return key → (shape, dtype) for every tensor, reading only the header where possible."""
    if path.suffix == ".safetensors":
        # safe_open reports an unreadable file as FileNotFoundError without an errno, so open it
        # here first to get the real reason.
        try:
            with open(path, "rb"):
                pass
        except OSError as error:
            raise _read_error(path, error) from error
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                index = {}
                for key in handle.keys():
                    tensor_slice = handle.get_slice(key)
                    index[key] = (tuple(tensor_slice.get_shape()), _dtype_from_name(path, key, tensor_slice.get_dtype()))
                return index
        except SafetensorError as error:
            raise AdapterError(f"{path}: invalid safetensors file ({error}); re-save the adapter") from error
        except OSError as error:
            raise _read_error(path, error) from error
    state = _load_bin_file(path)
    index = {key: (tuple(value.shape), value.dtype) for key, value in state.items()}
    del state
    return index


def _data_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """Return key → [start, stop) byte range in the file, from the header ``safe_open`` has validated.

    The layout: an 8-byte little-endian header length N, N bytes of JSON, then the data section,
    to which each tensor's ``data_offsets`` are relative.
    """
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
    except OSError as error:
        raise OutputError(f"{path}: cannot read: {error.strerror or error}") from error
    start = 8 + length
    return {
        key: (start + entry["data_offsets"][0], start + entry["data_offsets"][1])
        for key, entry in header.items()
        if key != "__metadata__"
    }


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _dtype_from_name(path: Path, key: str, name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise AdapterError(
            f"{path}: tensor {key!r} has dtype {name}; LoRA factors must be F64, F32, F16 or BF16"
        ) from None


def open_adapter(folder: Path, name: str, mergeable_only: bool = True) -> Adapter:
    """Open an adapter folder and discover its LoRA modules without reading tensor data.

    With ``mergeable_only`` false, a DoRA or LoRA-bias config is accepted and tensors that are not
    LoRA factors are listed in ``other_keys`` instead of raising, so the adapter can be inspected.

    Raises:
        AdapterError: for a config or tensor layout lorakit cannot merge, naming the file and fix.
        OutputError: when a file cannot be read.
    """
    config = _read_config(folder)
    config_path = folder / CONFIG_NAME
    _check_config(config_path, config, mergeable_only)
    weights_path = _weights_path(folder)
    index = _tensor_index(weights_path)
    if not index:
        raise AdapterError(f"{weights_path}: contains no tensors; re-save the adapter with PEFT's save_pretrained")

    offsets = _data_offsets(weights_path) if weights_path.suffix == ".safetensors" else None
    adapter = Adapter(name, folder, config, weights_path, index, offsets)
    factors: dict[str, dict[str, str]] = {}
    unexpected = []
    for key in index:
        match = _FACTOR_KEY.match(key) or _EMBEDDING_KEY.match(key)
        if match is None and _is_saved_module_key(key, config.get("modules_to_save") or []):
            adapter.saved_tensors[key] = index[key]
            continue
        if match is None:
            unexpected.append(key)
            continue
        factor = "A" if match.group("factor").endswith("A") else "B"
        factors.setdefault(match.group("path"), {})[factor] = key

    # PEFT saves the base weights of an adapted embedding layer too, when the embedding is in
    # target_modules or was resized. Only the first case has a key lorakit can tie to a module.
    for key in list(unexpected):
        match = _BASE_LAYER_KEY.match(key)
        keys = factors.get(match.group("path"), {}) if match else {}
        if "lora_embedding" in keys.get("A", ""):
            saved_path = match.group("path")
            module_path = saved_path[len(_PREFIX):] if saved_path.startswith(_PREFIX) else saved_path
            adapter.base_layers[module_path] = (key, *index[key])
            unexpected.remove(key)

    if unexpected and mergeable_only:
        raise AdapterError(f"{weights_path}: {_describe_unexpected(unexpected, config)}")
    adapter.other_keys = unexpected

    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    for saved_path, keys in sorted(factors.items()):
        module_path = saved_path[len(_PREFIX):] if saved_path.startswith(_PREFIX) else saved_path
        if set(keys) != {"A", "B"}:
            present, missing = ("lora_A", "lora_B") if "A" in keys else ("lora_B", "lora_A")
            raise AdapterError(
                f"{weights_path}: module {module_path!r} has a {present} tensor but no {missing} tensor; the file is "
                "incomplete, so re-save the adapter"
            )
        a_shape, a_dtype = index[keys["A"]]
        b_shape, b_dtype = index[keys["B"]]
        if "lora_embedding" in keys["A"]:
            kind = "embedding"
        elif len(a_shape) > 2:
            kind = "conv"
        else:
            kind = "linear"
        tensor_rank = a_shape[0]
        if len(a_shape) < 2 or len(b_shape) < 2 or a_shape[0] != b_shape[1] or len(a_shape) != len(b_shape):
            raise AdapterError(
                f"{weights_path}: module {module_path!r} has lora_A {list(a_shape)} and lora_B {list(b_shape)}, "
                "which do not form a low-rank pair (A is (r, ...), B is (out, r, ...))"
            )
        if a_dtype != b_dtype:
            raise AdapterError(f"{weights_path}: module {module_path!r} stores lora_A as {a_dtype} and lora_B as {b_dtype}")

        rank = resolve_pattern(rank_pattern, module_path, config["r"])
        alpha = resolve_pattern(alpha_pattern, module_path, config["lora_alpha"])
        if rank != tensor_rank:
            raise AdapterError(
                f"{weights_path}: module {module_path!r} has rank {tensor_rank} in its tensors but {rank} in "
                f"{config_path} (r / rank_pattern); the config does not belong to these weights"
            )
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        adapter.modules[module_path] = LoraModule(
            path=module_path,
            kind=kind,
            rank=rank,
            alpha=float(alpha),
            scale=scale,
            a_key=keys["A"],
            b_key=keys["B"],
            a_shape=a_shape,
            b_shape=b_shape,
            dtype=a_dtype,
        )
    return adapter


def _is_saved_module_key(key: str, module_names: list[str]) -> bool:
    """Return whether ``key`` is a weight PEFT saved for a module listed in modules_to_save.

    PEFT saves such a module's full parameters as ``base_model.model.<module path>.<parameter>``
    and, like PEFT 0.21 (``peft.utils.other._set_trainable``), a module path is listed when it ends
    with one of the names.
    """
    if not key.startswith(_PREFIX) or "." not in key[len(_PREFIX):]:
        return False
    module_path = key[len(_PREFIX):].rsplit(".", 1)[0]
    return any(module_path.endswith(name) for name in module_names)


# Tensor name parts of other PEFT methods, to name the method an adapter was really made with.
_OTHER_SCHEMES = {"hada_": "LoHa", "lokr_": "LoKr", "ia3_": "IA3", "lora_E": "AdaLoRA", "oft_": "OFT", "vera_": "VeRA"}


def _describe_unexpected(keys: list[str], config: dict[str, Any]) -> str:
    magnitude = [key for key in keys if "lora_magnitude_vector" in key]
    if magnitude:
        return (
            f"has DoRA magnitude tensors ({magnitude[0]!r}) although use_dora is not set; merging DoRA needs the "
            "base weights, which lorakit never loads"
        )
    bias = [key for key in keys if key.endswith((".lora_A.bias", ".lora_B.bias"))]
    if bias:
        return (
            f"has LoRA bias tensors ({bias[0]!r}) although lora_bias is not set; bias terms cannot be merged as "
            "low-rank factors"
        )
    first = keys[0]
    if config.get("modules_to_save") or any("modules_to_save" in key for key in keys):
        listed = ", ".join(config.get("modules_to_save") or []) or "none"
        return (
            f"has {len(keys)} tensors that are neither LoRA factors nor weights of the modules listed in "
            f"modules_to_save ({listed}), first {first!r}; re-save the adapter with PEFT's save_pretrained"
        )
    for part, method in _OTHER_SCHEMES.items():
        if any(part in key for key in keys):
            return (
                f"has {len(keys)} tensors named like a {method} adapter ({first!r}) although its config says LoRA; "
                f"lorakit cannot merge {method} adapters"
            )
    return (
        f"has {len(keys)} tensors that are not LoRA factors, first {first!r}; lorakit merges LoRA adapters saved "
        "by PEFT, whose tensors end in lora_A.weight and lora_B.weight"
    )
