"""safetensors files read from their headers and written a tensor at a time, and a base's shards."""

from __future__ import annotations

import io
import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from merge.errors import MergeError

INDEX_NAME = "model.safetensors.index.json"
# safetensors dtype -> (bytes per element, torch dtype)
ST_DTYPES: dict[str, tuple[int, torch.dtype]] = {
    "F64": (8, torch.float64), "F32": (4, torch.float32), "F16": (2, torch.float16),
    "BF16": (2, torch.bfloat16), "I64": (8, torch.int64), "I32": (4, torch.int32),
    "I16": (2, torch.int16), "I8": (1, torch.int8), "U8": (1, torch.uint8), "BOOL": (1, torch.bool),
    "U16": (2, torch.uint16), "U32": (4, torch.uint32), "U64": (8, torch.uint64),
    "F8_E4M3": (1, torch.float8_e4m3fn), "F8_E5M2": (1, torch.float8_e5m2),
}  # fmt: skip
ST_NAME = {torch_dtype: name for name, (_, torch_dtype) in ST_DTYPES.items()}
CASTABLE = {"F64", "F32", "F16", "BF16"}  # what --dtype converts; integers and fp8 stay as they are


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file, located by absolute byte offset."""

    file: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    nbytes: int


def read_header(path: Path) -> tuple[dict[str, str], list[Entry]]:
    """A safetensors file's metadata and tensors (in file order), from its header alone."""
    if not path.is_file():  # a FIFO would hang the read, a directory fail it with a traceback
        raise MergeError(f"{path} is not a regular file")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else size
        if length > min(size - 8, 100_000_000):
            raise MergeError(f"{path} is not a safetensors file (bad header length)")
        try:
            # Strict UTF-8 and no BOM, as safetensors reads it.
            header = json.loads(f.read(length).decode("utf-8"))
        except ValueError:
            raise MergeError(f"{path} is not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise MergeError(f"{path} is not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise MergeError(f"{path} is not a safetensors file (__metadata__ is not an object of strings)")
    entries = []
    for name, info in header.items():
        try:
            dtype, (begin, end), shape = info["dtype"], info["data_offsets"], tuple(info["shape"])
        except (KeyError, TypeError, ValueError):
            raise MergeError(f"{path} is not a safetensors file (bad entry for {name!r})") from None
        # What safetensors itself requires (a bool is an int to Python, not to a header).
        numbers = (begin, end, *shape)
        if (
            any(isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < 2**63 for n in numbers)
            or begin > end
        ):
            raise MergeError(f"{path} is not a safetensors file (bad offsets or shape for {name!r})")
        if not isinstance(dtype, str) or dtype not in ST_DTYPES:
            raise MergeError(f"{path.name}: tensor {name!r} has dtype {dtype}, unknown to this merge")
        if end - begin != math.prod(shape) * ST_DTYPES[dtype][0] or 8 + length + end > size:
            raise MergeError(f"{path.name}: tensor {name!r} is truncated or corrupt")
        entries.append(Entry(path, name, dtype, shape, 8 + length + begin, end - begin))
    # safetensors' own rule: the tensors fill the data from its first byte to the file's last, with
    # no overlap and no gap (a zero-size tensor may share its offset with the next one).
    entries.sort(key=lambda e: (e.start, e.nbytes))
    position = 8 + length
    for entry in entries:
        if entry.start != position:
            raise MergeError(
                f"{path.name}: tensor {entry.name!r} overlaps another or leaves a gap before it: corrupt file"
            )
        position += entry.nbytes
    if position != size:
        raise MergeError(f"{path.name}: {size - position} bytes after the last tensor: corrupt file")
    return metadata, entries


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``, or a one-line MergeError saying what is wrong with it."""
    if not path.is_file():  # a FIFO would hang the read
        raise MergeError(f"{what} {path} is not a regular file")
    try:
        document = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise MergeError(f"{what} {path} is not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise MergeError(f"{what} {path} is not a JSON object")
    return document


def _weight_map(directory: Path, what: str) -> dict[str, str] | None:
    """The index's tensor -> shard file map, or None when ``directory`` has no index."""
    index = directory / INDEX_NAME
    if not index.exists():
        return None
    weight_map = read_json(index, f"{what} index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise MergeError(f"{what} index {index} has no weight_map of tensor -> file names")
    if not weight_map:
        raise MergeError(f"{what} index {index} has an empty weight_map: it names no tensor")
    for file in weight_map.values():
        # transformers joins each name to the checkpoint's directory: a path elsewhere (or a
        # sub-directory's file, whose name another shard may share) is not this checkpoint's shard.
        if file in ("", ".", "..") or Path(file).name != file or not file.isprintable():
            raise MergeError(f"{what} index {index} names {file!r}, not a file name in {directory}")
    return weight_map


def weight_files(base: Path, what: str = "base") -> list[Path]:
    """The safetensors files of a checkpoint: the ones its index names, else every one there is."""
    weight_map = _weight_map(base, what)
    if weight_map is not None:
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (base / n).exists()]
        if missing:
            raise MergeError(f"{what} {base} index names {missing[0]!r}, which is missing")
        return [base / n for n in names]
    files = sorted(base.glob("*.safetensors"))
    if not files:
        raise MergeError(f"{what} {base} holds no *.safetensors weights")
    return files


def base_index(files: Sequence[Path]) -> dict[str, Entry]:
    """Every tensor name -> where it lies, read from headers only."""
    index: dict[str, Entry] = {}
    for file in files:
        for entry in read_header(file)[1]:
            if entry.name in index:
                raise MergeError(
                    f"base tensor {entry.name!r} is in both {index[entry.name].file.name} and {file.name}"
                )
            index[entry.name] = entry
    return index


def index_problems(directory: Path, tensors: Mapping[str, Entry], what: str = "base") -> list[str]:
    """Tensors the index puts in a shard that does not hold them. transformers loads what the
    index names, so a tensor it names and no shard holds is a broken checkpoint, not one to
    merge or pass with that tensor left out."""
    weight_map = _weight_map(directory, what) or {}
    return [
        f"{what} index {directory / INDEX_NAME} puts tensor {name!r} in {file}, which does not hold it"
        for name, file in sorted(weight_map.items())
        if name not in tensors or tensors[name].file != directory / file
    ]


def read_exactly(src: io.RawIOBase, start: int, nbytes: int) -> bytearray:
    """``nbytes`` from ``start`` of an unbuffered file (``open(..., buffering=0)``), whose reads may be short."""
    buffer = bytearray(nbytes)
    view, done = memoryview(buffer), 0
    src.seek(start)
    while done < nbytes:
        got = src.readinto(view[done:])
        if not got:
            raise MergeError(f"{getattr(src, 'name', 'input')} ended early: truncated safetensors file")
        done += got
    return buffer


def read_tensor(src: io.RawIOBase, entry: Entry) -> torch.Tensor:
    torch_dtype = ST_DTYPES[entry.dtype][1]
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=torch_dtype)
    return torch.frombuffer(read_exactly(src, entry.start, entry.nbytes), dtype=torch_dtype).reshape(
        entry.shape
    )


def tensor_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes, as a flat uint8 view (what safetensors stores, and what a bit check compares)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def write_tensor(dst: BinaryIO, tensor: torch.Tensor) -> None:
    if tensor.numel():
        dst.write(tensor_bytes(tensor).numpy().data)
