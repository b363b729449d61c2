"""The NF4 round trip of ``--base-weights nf4``: what a QLoRA adapter was trained against.

NF4, as bitsandbytes stores QLoRA bases (quantize_4bit with quant_type="nf4", blocksize 64,
compress_statistics=True): per 64 weights one absmax; the absmaxes, less their mean, are
themselves quantized to 8 bits in blocks of 256 with bitsandbytes' signed dynamic map.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from merge import limits
from merge.errors import MergeError, first_line
from merge.layout import LM_PREFIX, architecture_class
from merge.safetensors_io import Entry

NF4_BLOCKSIZE = 64
NF4_STATS_BLOCKSIZE = 256
# bitsandbytes' NF4 table (functional.get_4bit_type("nf4")): normal quantiles, normalised to [-1, 1].
NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)  # fmt: skip


def dynamic_map(max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (functional.create_dynamic_map), used for the absmaxes."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    for i in range(max_exponent_bits):
        fraction_items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1
        boundaries = torch.linspace(0.1, 1, fraction_items)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


DYNAMIC_CODE = dynamic_map()


def _blockwise_scale(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks of ``flat`` (the last one zero-padded) scaled into [-1, 1], and each block's absmax.
    Scaled by the reciprocal of the absmax, as bitsandbytes' kernels do."""
    blocks = torch.nn.functional.pad(flat, (0, -flat.numel() % blocksize)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    inverse = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    return (blocks * inverse[:, None]).clamp(-1.0, 1.0), absmax


def nf4_quantize(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 codes of every value (blocks of 64) and the blocks' absmaxes. bitsandbytes' dQuantizeNF4
    compares with the midpoints between codes, and a value on a midpoint takes the lower code:
    bucketize's rule."""
    scaled, absmax = _blockwise_scale(flat, NF4_BLOCKSIZE)
    return torch.bucketize(scaled, (NF4_CODE[1:] + NF4_CODE[:-1]) / 2), absmax


def dynamic_quantize(
    flat: torch.Tensor, blocksize: int = NF4_STATS_BLOCKSIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit dynamic codes of every value and the blocks' absmaxes, chosen by bitsandbytes' CUDA
    binary search (dQuantize<0>, vectorised here): the nearest code, except that a value on a
    midpoint goes wherever the search path ends."""
    x, absmax = _blockwise_scale(flat, blocksize)
    code = DYNAMIC_CODE
    pivot = torch.full(x.shape, 127, dtype=torch.long)
    lower_pivot, upper_pivot = torch.zeros_like(pivot), torch.full_like(pivot, 255)
    lower, upper = torch.full_like(x, -1.0), torch.full_like(x, 1.0)
    value = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        right = x > value
        lower_pivot, lower = torch.where(right, pivot, lower_pivot), torch.where(right, value, lower)
        upper_pivot, upper = torch.where(right, upper_pivot, pivot), torch.where(right, upper, value)
        pivot = pivot + torch.where(right, step, -step)
        value = code[pivot]
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    above = torch.where(x > (upper + value) * 0.5, upper_pivot, pivot)
    below = torch.where(x < (lower + value) * 0.5, lower_pivot, pivot)
    return torch.where(x > value, above, below), absmax


def nf4_roundtrip(
    weight: torch.Tensor, dtype: torch.dtype | None = None, *, double_quant: bool = True
) -> torch.Tensor:
    """``weight`` quantized to NF4 and dequantized again, as bitsandbytes would hand it to a matmul.
    Works through limits.CHUNK_VALUES values at a time: beside the result it holds one byte per value."""
    chunk_values = limits.CHUNK_VALUES
    flat = weight.detach().reshape(-1)
    n = flat.numel()
    codes = torch.empty(n, dtype=torch.uint8)
    absmaxes = []
    for start in range(0, n, chunk_values):
        index, absmax = nf4_quantize(flat[start : start + chunk_values].to(torch.float32))
        codes[start : start + chunk_values] = index.reshape(-1)[: min(chunk_values, n - start)].to(
            torch.uint8
        )
        absmaxes.append(absmax)
    absmax = torch.cat(absmaxes) if absmaxes else torch.zeros(0)
    if double_quant and absmax.numel():
        offset = absmax.mean()
        q_stats, stats_absmax = dynamic_quantize(absmax - offset)
        absmax = (DYNAMIC_CODE[q_stats] * stats_absmax[:, None]).reshape(-1)[: absmax.numel()] + offset
    out = torch.empty(n, dtype=dtype or weight.dtype)
    blocks_per_chunk = chunk_values // NF4_BLOCKSIZE
    for chunk, start in enumerate(range(0, n, chunk_values)):
        index = codes[start : start + chunk_values].long()
        scale = absmax[chunk * blocks_per_chunk : (chunk + 1) * blocks_per_chunk]
        index = torch.nn.functional.pad(index, (0, -index.numel() % NF4_BLOCKSIZE)).view(-1, NF4_BLOCKSIZE)
        # As bitsandbytes' dequantize kernel: the fp32 product, rounded once to the weight's dtype.
        values = (NF4_CODE[index] * scale[:, None]).reshape(-1)[: min(chunk_values, n - start)]
        out[start : start + chunk_values] = values
    return out.reshape(weight.shape)


def lm_linear_weights(base: Path, index: Mapping[str, Entry]) -> list[str]:
    """The language model's nn.Linear weights: what a 4-bit (QLoRA) load quantizes. The embeddings
    and the tied output head stay in 16 bits there, and so here."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(base)
    except Exception as exc:  # noqa: BLE001 - whatever transformers objects to in config.json, one line
        raise MergeError(f"base config.json is not one transformers reads ({first_line(exc)})") from None
    architecture, model_class = architecture_class(getattr(config, "architectures", None))
    if model_class is None:
        raise MergeError(
            f"base architecture {architecture!r} is unknown to transformers; cannot find its linears"
        )
    try:
        with torch.device("meta"):
            model = model_class(config)
    except Exception as exc:  # noqa: BLE001 - as above: a config the model class rejects
        raise MergeError(f"base config.json does not build a {architecture} ({first_line(exc)})") from None
    names = [
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.startswith(LM_PREFIX)
    ]
    return sorted(n for n in names if n in index)
