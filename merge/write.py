"""One output safetensors shard, streamed to disk a tensor (or a block of rows) at a time."""

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

from merge import limits
from merge.errors import MergeError
from merge.lora import LoraPair, merged_tensor
from merge.nf4 import nf4_roundtrip
from merge.output import naming
from merge.safetensors_io import ST_DTYPES, Entry, read_exactly, read_tensor, write_tensor


@dataclass(frozen=True)
class Planned:
    """One output tensor: where it comes from and what happens to it on the way."""

    name: str
    source: Entry
    dtype: str
    pair: LoraPair | None = None
    nf4: bool = False

    @property
    def nbytes(self) -> int:
        return math.prod(self.source.shape) * ST_DTYPES[self.dtype][0]


def _stream(src: io.RawIOBase, dst: BinaryIO, item: Planned) -> None:
    """Copy (bit for bit) or cast one tensor through a bounded buffer."""
    itemsize, source_dtype = ST_DTYPES[item.source.dtype]
    step = max(limits.CHUNK_BYTES // itemsize, 1) * itemsize
    for offset in range(0, item.source.nbytes, step):
        chunk = read_exactly(src, item.source.start + offset, min(step, item.source.nbytes - offset))
        if item.dtype == item.source.dtype:
            dst.write(chunk)
        else:
            write_tensor(dst, cast(item, torch.frombuffer(chunk, dtype=source_dtype)))


def cast(item: Planned, source: torch.Tensor) -> torch.Tensor:
    """``source`` (part of a copied tensor) as the output dtype, refused where a finite value
    overflows it: a bf16 weight of 1e6 is infinite in fp16, a cast no model survives."""
    result = source.to(ST_DTYPES[item.dtype][1])
    if not overflowed(source, result):
        return result
    largest = float(source[torch.isfinite(source)].abs().max())
    raise MergeError(
        f"base tensor {item.name!r} holds values beyond {item.dtype}'s range (largest {largest:g}): "
        f"choose a --dtype that holds them, or leave --dtype out to keep the base's {item.source.dtype}"
    )


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN and no infinity, by the extremes alone (NaN propagates through them): a twentieth of
    the time of isfinite().all() on 16 MiB of halves."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return math.isfinite(float(low)) and math.isfinite(float(high))


def overflowed(source: torch.Tensor, result: torch.Tensor) -> bool:
    """Whether a cast made a finite value infinite. A widening cast never does, and most chunks are
    all finite: those cost one cheap pass, not the full comparison."""
    if torch.finfo(result.dtype).max >= torch.finfo(source.dtype).max or all_finite(result):
        return False
    return not bool((torch.isfinite(result) | ~torch.isfinite(source)).all())


def write_shard(path: Path, items: Sequence[Planned], metadata: Mapping[str, str]) -> dict[str, float]:
    """Write one safetensors file, streaming each tensor from its source as it goes; return the
    relative error that the NF4 round trip made in each weight it touched.

    safetensors' save_file needs the whole shard in memory, and copies it once more to bytes; the
    header here is known up front (names, dtypes, shapes), so each tensor is read, changed and
    written alone. Tensors are ordered as save_file orders them (widest dtype first, then by name)
    so that every tensor stays aligned to its element size."""
    order = sorted(items, key=lambda p: (-ST_DTYPES[p.dtype][0], p.name))
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **metadata}}
    position = 0
    for item in order:
        header[item.name] = {
            "dtype": item.dtype,
            "shape": list(item.source.shape),
            "data_offsets": [position, position + item.nbytes],
        }
        position += item.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    sources: dict[Path, io.RawIOBase] = {}
    nf4_errors: dict[str, float] = {}
    try:
        with naming(path), path.open("wb") as dst:
            dst.write(struct.pack("<Q", len(blob)) + blob)
            data_start = dst.tell()
            for item in order:
                src = sources.get(item.source.file)
                if src is None:
                    src = sources[item.source.file] = item.source.file.open("rb", buffering=0)
                expected = dst.tell() - data_start + item.nbytes
                if item.pair is None and not item.nf4:
                    _stream(src, dst, item)
                else:
                    weight = read_tensor(src, item.source)
                    if item.nf4:
                        original, weight = weight, nf4_roundtrip(weight)
                        nf4_errors[item.source.name] = _relative_error(weight, original)
                        del original
                    _write_changed(dst, item, weight, item.pair, ST_DTYPES[item.dtype][1])
                    del weight
                if dst.tell() - data_start != expected:
                    raise MergeError(f"internal error: {item.name} wrote the wrong number of bytes")
    finally:
        for src in sources.values():
            src.close()
    return nf4_errors


def _write_changed(
    dst: BinaryIO, item: Planned, weight: torch.Tensor, pair: LoraPair | None, dtype: torch.dtype
) -> None:
    """Write ``weight`` (merged with ``pair`` when given) as ``dtype``, a block of rows at a time, so
    that the fp32 copies stay small whatever the weight's size."""
    rows = max(1, limits.CHUNK_VALUES // max(1, math.prod(weight.shape[1:])))
    if weight.ndim == 0 or pair is None and weight.dtype == dtype:
        write_tensor(dst, _finite(item, weight.to(dtype)))
        return
    for start in range(0, weight.shape[0], rows):
        block = weight[start : start + rows]
        if pair is None:
            write_tensor(dst, _finite(item, block.to(dtype)))
        else:
            part = LoraPair(pair.module, pair.a, pair.b[start : start + rows], pair.scale)
            write_tensor(dst, _finite(item, merged_tensor(block, part, dtype)))


def _finite(item: Planned, tensor: torch.Tensor) -> torch.Tensor:
    """A merged (or NF4 round-tripped) weight that overflowed, or that a non-finite base value
    spoilt, is no model to write: the adapter's finite factors are checked on reading, so what is
    left is a scale or a dtype too large for these weights."""
    if not all_finite(tensor):
        how = f"lora scale {item.pair.scale:g}, " if item.pair is not None else ""
        raise MergeError(
            f"merged weight {item.name!r} would hold NaN or infinite values ({how}output {item.dtype}): "
            "the adapter's scale or factors are too large for it, --dtype too narrow, or the base "
            "value is not finite"
        )
    return tensor


def _relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """||approx - exact|| / ||exact||, accumulated a chunk at a time."""
    error = norm = 0.0
    a, e = approx.reshape(-1), exact.reshape(-1)
    step = limits.CHUNK_VALUES
    for start in range(0, e.numel(), step):
        exact_part = e[start : start + step].to(torch.float64)
        error += float((a[start : start + step].to(torch.float64) - exact_part).square().sum())
        norm += float(exact_part.square().sum())
    return math.sqrt(error / norm) if norm > 0 else 0.0
