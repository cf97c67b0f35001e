"""The streamed safetensors writer against ``safetensors.torch.save_file``."""

from __future__ import annotations

import hashlib
import json
import random
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.writer import FileDigest, SafetensorsWriter


def sample_tensors() -> dict[str, torch.Tensor]:
    """Tensors of every supported dtype, with names that sort differently as text and as numbers.

    One name needs JSON escapes and UTF-8, which ``save_file`` writes unescaped.
    """
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for index, dtype in enumerate((torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float32)):
        for layer in (0, 2, 10):
            name = f"base_model.model.layers.{layer}.proj{index}.lora_A.weight"
            tensors[name] = torch.randn((3 + index, 5), generator=generator).to(dtype)
    tensors["empty.weight"] = torch.empty((0, 4))
    tensors['b\u00e4r.\x01"quoted"\\.weight'] = torch.randn((2, 2), generator=generator)
    tensors["scalar_like.weight"] = torch.randn((1,), generator=generator)
    return tensors


def write_streamed(path, tensors: dict[str, torch.Tensor], metadata, order: list[str]) -> None:
    specs = [(name, tuple(tensor.shape), tensor.dtype) for name, tensor in tensors.items()]
    writer = SafetensorsWriter(path, specs, metadata)
    for name in order:
        writer.write(name, tensors[name])
    writer.close()


def header_of(path) -> tuple[bytes, dict]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    raw = data[8 : 8 + length]
    return raw, json.loads(raw)


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}, {"note": "gr\u00fc\u00df\n\t\"x\""}])
def test_writer_matches_save_file_bytes(tmp_path, metadata):
    tensors = sample_tensors()
    order = list(tensors)
    random.Random(1).shuffle(order)
    write_streamed(tmp_path / "streamed.safetensors", tensors, metadata, order)
    save_file(tensors, str(tmp_path / "reference.safetensors"), metadata=metadata)

    assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_writer_header_independent_of_order(tmp_path):
    tensors = sample_tensors()
    names = list(tensors)
    reversed_tensors = {name: tensors[name] for name in reversed(names)}
    write_streamed(tmp_path / "forward.safetensors", tensors, {"format": "pt"}, names)
    write_streamed(tmp_path / "backward.safetensors", reversed_tensors, {"format": "pt"}, names[::-1])

    forward, backward = header_of(tmp_path / "forward.safetensors"), header_of(tmp_path / "backward.safetensors")
    assert forward[0] == backward[0]
    assert (tmp_path / "forward.safetensors").read_bytes() == (tmp_path / "backward.safetensors").read_bytes()


def test_writer_sorts_metadata_keys(tmp_path):
    """save_file orders several metadata keys by hash, differently per run, but the writer sorts them."""
    tensors = {"a": torch.ones(2)}
    write_streamed(tmp_path / "one.safetensors", tensors, {"zeta": "1", "alpha": "2", "format": "pt"}, ["a"])
    write_streamed(tmp_path / "two.safetensors", tensors, {"format": "pt", "alpha": "2", "zeta": "1"}, ["a"])
    _, header = header_of(tmp_path / "one.safetensors")

    assert list(header["__metadata__"]) == ["alpha", "format", "zeta"]
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "two.safetensors").read_bytes()
    assert load_file(str(tmp_path / "one.safetensors"))["a"].tolist() == [1.0, 1.0]


def test_writer_header_order_and_padding(tmp_path):
    tensors = sample_tensors()
    write_streamed(tmp_path / "out.safetensors", tensors, {"format": "pt"}, list(tensors))
    raw, header = header_of(tmp_path / "out.safetensors")

    assert len(raw) % 8 == 0
    assert list(header)[0] == "__metadata__"
    entries = [(name, entry) for name, entry in header.items() if name != "__metadata__"]
    starts = [entry["data_offsets"][0] for _, entry in entries]
    assert starts == sorted(starts)
    rank = {"F64": 0, "F32": 1, "BF16": 2, "F16": 3}
    keys = [(rank[entry["dtype"]], name) for name, entry in entries]
    assert keys == sorted(keys)


def test_writer_output_loads(tmp_path):
    tensors = sample_tensors()
    write_streamed(tmp_path / "out.safetensors", tensors, {"format": "pt"}, list(tensors))
    loaded = load_file(str(tmp_path / "out.safetensors"))

    assert sorted(loaded) == sorted(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor)


def test_writer_rejects_wrong_shape_or_dtype(tmp_path):
    writer = SafetensorsWriter(tmp_path / "out.safetensors", [("a", (2, 3), torch.float32)])
    with pytest.raises(ValueError, match="planned"):
        writer.write("a", torch.zeros(3, 2))
    with pytest.raises(ValueError, match="planned"):
        writer.write("a", torch.zeros(2, 3, dtype=torch.float16))
    writer.write("a", torch.zeros(2, 3))
    writer.close()


def test_writer_close_reports_missing_tensor(tmp_path):
    writer = SafetensorsWriter(tmp_path / "out.safetensors", [("a", (2,), torch.float32), ("b", (2,), torch.float32)])
    writer.write("b", torch.ones(2))
    with pytest.raises(RuntimeError, match="1 planned tensor.*'a'"):
        writer.close()


def test_writer_rejects_duplicate_name(tmp_path):
    with pytest.raises(ValueError, match="planned twice"):
        SafetensorsWriter(tmp_path / "out.safetensors", [("a", (2,), torch.float32), ("a", (2,), torch.float32)])


def test_writer_never_overwrites(tmp_path):
    (tmp_path / "out.safetensors").write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        SafetensorsWriter(tmp_path / "out.safetensors", [("a", (2,), torch.float32)])
    assert (tmp_path / "out.safetensors").read_bytes() == b"keep"


def test_writer_writes_non_contiguous_tensor(tmp_path):
    source = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    writer = SafetensorsWriter(tmp_path / "out.safetensors", [("t", (4, 3), torch.float32)])
    writer.write("t", source.t())
    writer.close()

    assert torch.equal(load_file(str(tmp_path / "out.safetensors"))["t"], source.t())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_file_digest_follows_complete_bytes(tmp_path, seed):
    """Hashing each newly final range as writes arrive, in any order, gives the file's sha256."""
    tensors = sample_tensors()
    order = list(tensors)
    random.Random(seed).shuffle(order)
    path = tmp_path / "out.safetensors"
    writer = SafetensorsWriter(path, [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()], {"format": "pt"})
    digest = FileDigest(path)
    complete = [writer.complete_bytes]
    for name in order:
        writer.write(name, tensors[name])
        complete.append(writer.complete_bytes)
        digest.update_to(writer.complete_bytes)
    writer.close()

    assert complete == sorted(complete)
    assert complete[0] > 8
    assert complete[-1] == writer.size == path.stat().st_size
    assert digest.hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()


def test_complete_bytes_stops_at_first_gap(tmp_path):
    specs = [("a", (4,), torch.float32), ("b", (4,), torch.float32), ("c", (4,), torch.float32)]
    writer = SafetensorsWriter(tmp_path / "out.safetensors", specs)
    start = writer.complete_bytes
    writer.write("b", torch.ones(4))
    assert writer.complete_bytes == start
    writer.write("a", torch.ones(4))
    assert writer.complete_bytes == start + 32
    writer.write("c", torch.ones(4))
    assert writer.complete_bytes == writer.size == start + 48
    writer.close()
