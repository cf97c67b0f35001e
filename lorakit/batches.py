"""Moving one batch of a group between the source files, reused host buffers and the merge device.

A batch is L modules of one group. Its factors are read with ``pread`` into one staging buffer,
as stored, one slot per source and factor: A_i of shape (L, r_i, n), then B_i of shape
(L, m, r_i). On CUDA the used part of that buffer crosses to the device in one copy and is
converted to float32 there. The merged factors are cast on the device into one buffer that
crosses back in one copy. On the CPU float32 inputs are used in place and the methods write into
a reused result buffer.
"""

from __future__ import annotations

import math
from concurrent.futures import Future
import torch

from lorakit.errors import AdapterError
from lorakit.plan import STAGING_ALIGNMENT, Batch, ModuleGroup, Plan

__all__ = ["Buffers", "Slot", "check_finite", "prefetch_batch", "read_batch", "synchronize", "to_device", "to_host"]

# (byte offset in the staging buffer, stored dtype, shape) of one factor of one source.
Slot = tuple[int, torch.dtype, tuple[int, ...]]


def carve(buffer: torch.Tensor, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[torch.Tensor, int]:
    """Return a ``dtype`` view of ``shape`` at byte ``offset`` of a uint8 buffer, and the next aligned offset."""
    size = dtype.itemsize * math.prod(shape)
    view = buffer[offset : offset + size].view(dtype).view(shape)
    return view, offset + -(-size // STAGING_ALIGNMENT) * STAGING_ALIGNMENT


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that host timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _DoubleBuffer:
    """Two byte buffers used in turn, so that the writer thread can write one while the next batch fills the other."""

    def __init__(self, size: int, pin: bool):
        self.tensors = [torch.empty(size, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        self.pending: list[Future | None] = [None, None]
        self.last = 1

    def acquire(self) -> torch.Tensor:
        """Return the other buffer than last time, once the write that last used it has finished."""
        self.last ^= 1
        pending = self.pending[self.last]
        if pending is not None:
            self.pending[self.last] = None
            pending.result()
        return self.tensors[self.last]


class Buffers:
    """Host buffers that every batch reuses, allocated once at the size of the largest batch.

    Fresh memory costs a page fault per 4 KiB page on first touch, which made up most of the
    time a CPU merge spent outside I/O before these buffers were reused. ``staging`` receives
    the stored factors. On the CPU, inputs stored in another dtype are converted into
    ``converted``, methods may use ``scratch`` for temporaries, and they write their float32
    results into ``result``. The results are cast into ``output`` unless they are written as
    they are (float32 on the CPU). Whichever of the two the writer thread reads from is doubled.
    On CUDA ``staging`` and ``output`` are pinned, and the device's caching allocator serves
    the rest. Pages of a buffer that a run never touches cost no memory.
    """

    def __init__(self, plan: Plan):
        pin = plan.device.type == "cuda"
        self.staging = torch.empty(plan.staging_bytes(), dtype=torch.uint8, pin_memory=pin)
        on_cpu = plan.device.type == "cpu"
        self.converted = torch.empty(plan.converted_bytes(), dtype=torch.uint8) if on_cpu else None
        self.scratch = torch.empty(plan.scratch_bytes(), dtype=torch.uint8) if on_cpu else None
        output_bytes = plan.host_output_bytes()
        self.output = _DoubleBuffer(output_bytes, pin) if output_bytes else None
        result_bytes = plan.result_bytes()
        self.result: _DoubleBuffer | torch.Tensor | None = None
        if result_bytes and self.output is None:
            self.result = _DoubleBuffer(result_bytes, pin=False)
        elif result_bytes:
            self.result = torch.empty(result_bytes, dtype=torch.uint8)

    def result_views(self, group: ModuleGroup, count: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Return float32 views (L, K, n) and (L, m, K) for the methods' result, or None off the CPU."""
        if self.result is None:
            return None
        buffer = self.result.acquire() if isinstance(self.result, _DoubleBuffer) else self.result
        a, offset = carve(buffer, 0, torch.float32, (count, group.output_rank, group.in_size))
        b, _ = carve(buffer, offset, torch.float32, (count, group.out_features, group.output_rank))
        return a, b

    def written_by(self, future: Future) -> None:
        """Record that ``future`` writes from the buffer that the last ``to_host`` returned views of."""
        holder = self.output if self.output is not None else self.result
        if isinstance(holder, _DoubleBuffer):
            holder.pending[holder.last] = future


def read_batch(plan: Plan, batch: Batch, staging: torch.Tensor) -> tuple[list[Slot], int]:
    """Read every source's factors of the batch's modules into ``staging``, as stored.

    Returns each factor's slot, A then B per source, and the bytes of ``staging`` used.
    """
    group = batch.group
    count = len(batch.indices)
    slots = []
    offset = 0
    for adapter, rank, dtype in zip(plan.adapters, group.source_ranks, group.source_dtypes):
        for factor, shape in (("A", (count, rank, group.in_size)), ("B", (count, group.out_features, rank))):
            view, next_offset = carve(staging, offset, dtype, shape)
            for index, path in enumerate(batch.module_paths):
                module = adapter.modules[path]
                adapter.read_into(module.a_key if factor == "A" else module.b_key, view[index])
            slots.append((offset, dtype, shape))
            offset = next_offset
    return slots, offset


def prefetch_batch(plan: Plan, batch: Batch) -> None:
    """Start reading the batch's factors from the disk in the background (see ``Adapter.prefetch``)."""
    for adapter in plan.adapters:
        keys = []
        for path in batch.module_paths:
            module = adapter.modules[path]
            keys += [module.a_key, module.b_key]
        adapter.prefetch(keys)


def to_device(plan: Plan, buffers: Buffers, slots: list[Slot], used: int) -> list[torch.Tensor]:
    """Return the staged factors as float32 tensors on the plan's device, in slot order.

    On CUDA the used part of the staging buffer crosses in one host-to-device copy and is
    converted there. On the CPU float32 inputs are views of the staging buffer, and others are
    converted into ``buffers.converted``.
    """
    staging = buffers.staging
    if plan.device.type == "cuda":
        staging = staging[:used].to(plan.device, non_blocking=True)
    tensors = []
    converted_offset = 0
    for offset, dtype, shape in slots:
        view, _ = carve(staging, offset, dtype, shape)
        if dtype == torch.float32:
            tensors.append(view)
        elif buffers.converted is None:
            tensors.append(view.float())
        else:
            target, converted_offset = carve(buffers.converted, converted_offset, torch.float32, shape)
            tensors.append(target.copy_(view))
    return tensors


def check_finite(plan: Plan, batch: Batch, tensors: list[torch.Tensor]) -> None:
    """Raise AdapterError naming the first module whose factors hold NaN or Inf.

    A sum is finite only if every term is, and a reduction allocates nothing, unlike an
    elementwise ``isfinite``, which ran at a twentieth of the speed. A sum can also overflow to
    Inf from finite terms, so a non-finite sum is confirmed module by module before raising.
    """
    sums = torch.stack([tensor.sum() for tensor in tensors])
    if bool(torch.isfinite(sums).all()):
        return
    for slot, tensor in enumerate(tensors):
        for index in range(tensor.shape[0]):
            if not bool(torch.isfinite(tensor[index]).all()):
                adapter = plan.adapters[slot // 2]
                raise AdapterError(
                    f"{adapter.weights_path}: module {batch.module_paths[index]!r} has NaN or Inf values in "
                    f"lora_{'AB'[slot % 2]}; the adapter is corrupt or diverged in training"
                )


def to_host(plan: Plan, group: ModuleGroup, buffers: Buffers, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the merged factors on the host in the output dtype.

    On CUDA they are cast on the device into one buffer that crosses in one device-to-host copy.
    """
    if buffers.output is None:
        return a.contiguous(), b.contiguous()
    dtype = plan.output_dtype
    host = buffers.output.acquire()
    target = host
    if plan.device.type == "cuda":
        target = torch.empty(group.output_bytes(dtype, a.shape[0]), dtype=torch.uint8, device=plan.device)
    a_out, offset = carve(target, 0, dtype, tuple(a.shape))
    b_out, used = carve(target, offset, dtype, tuple(b.shape))
    a_out.copy_(a)
    b_out.copy_(b)
    if plan.device.type == "cuda":
        host[:used].copy_(target)
        a_out, _ = carve(host, 0, dtype, tuple(a.shape))
        b_out, _ = carve(host, offset, dtype, tuple(b.shape))
    return a_out, b_out

