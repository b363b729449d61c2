"""The NF4 round trip of ``--base-weights nf4`` against bitsandbytes' definition of it.

bitsandbytes' CUDA kernels are what a QLoRA adapter was trained against; they do not run here, so
their decision rules are ported below as oracles (the NF4 threshold tree and the 8-bit binary
search, from csrc/kernels.cu). Where bitsandbytes itself imports, it is compared directly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from merge import limits
from merge.nf4 import DYNAMIC_CODE, NF4_CODE, dynamic_quantize, nf4_quantize, nf4_roundtrip

# dQuantizeNF4's thresholds (bitsandbytes csrc/kernels.cu): x above one goes to the upper code.
CUDA_NF4_THRESHOLDS = [
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
    -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
    0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
]  # fmt: skip


def cuda_dquantize(code: np.ndarray, x: np.float32) -> int:
    """bitsandbytes' dQuantize<0> (csrc/kernels.cu), statement by statement, in float32."""
    pivot, upper_pivot, lower_pivot = 127, 255, 0
    lower, upper = np.float32(-1.0), np.float32(1.0)
    val = code[pivot]
    i = 64
    while i > 0:
        if x > val:
            lower_pivot, lower, pivot = pivot, val, pivot + i
        else:
            upper_pivot, upper, pivot = pivot, val, pivot - i
        val = code[pivot]
        i >>= 1
    if upper_pivot == 255:
        upper = code[upper_pivot]
    if lower_pivot == 0:
        lower = code[lower_pivot]
    if x > val:
        return upper_pivot if x > np.float32((upper + val) * np.float32(0.5)) else pivot
    return lower_pivot if x < np.float32((lower + val) * np.float32(0.5)) else pivot


def test_nf4_code_is_the_normal_quantile_table() -> None:
    # bitsandbytes' create_normal_map(offset=0.9677083, use_extra_value=True), 16 non-padding values.
    normal = torch.distributions.Normal(0.0, 1.0)
    offset = 0.9677083
    positive = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([positive, negative, torch.zeros(1, dtype=torch.float64)]).sort().values
    torch.testing.assert_close(NF4_CODE.double(), values / values.max(), atol=1e-6, rtol=0)


def test_nf4_decisions_use_the_cuda_kernel_thresholds() -> None:
    midpoints = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2
    assert torch.equal(midpoints, torch.tensor(CUDA_NF4_THRESHOLDS, dtype=torch.float32))
    # On a threshold the kernel's `x > t` is false: the lower code wins.
    at = torch.tensor(CUDA_NF4_THRESHOLDS, dtype=torch.float32)
    index, _ = nf4_quantize(torch.cat([at, torch.ones(1)]))
    assert index.flatten()[:15].tolist() == list(range(15))


def test_dynamic_map_shape() -> None:
    assert DYNAMIC_CODE.numel() == 256 and DYNAMIC_CODE.dtype == torch.float32
    assert bool((DYNAMIC_CODE[1:] > DYNAMIC_CODE[:-1]).all())
    assert DYNAMIC_CODE[-1] == 1.0 and 0.0 in DYNAMIC_CODE.tolist()
    assert int((DYNAMIC_CODE < 0).sum()) == 127 and int((DYNAMIC_CODE > 0).sum()) == 128
    # The smallest magnitude: exponent 10^-6 times the mean of linspace(0.1, 1, 2).
    assert float(DYNAMIC_CODE[DYNAMIC_CODE > 0].min()) == pytest.approx(0.55e-6, rel=1e-6)


def test_absmax_quantization_matches_the_cuda_binary_search() -> None:
    code = DYNAMIC_CODE.numpy()
    gen = torch.Generator().manual_seed(0)
    midpoints = (DYNAMIC_CODE[1:] + DYNAMIC_CODE[:-1]) / 2
    # Uniform values, the codes themselves, their midpoints and one ulp either side, the ends.
    values = torch.cat(
        [
            torch.rand(3000, generator=gen) * 2 - 1,
            torch.randn(1000, generator=gen) * 1e-3,
            DYNAMIC_CODE,
            midpoints,
            torch.nextafter(midpoints, torch.tensor(2.0)),
            torch.nextafter(midpoints, torch.tensor(-2.0)),
            torch.tensor([-1.0, 1.0, 0.0]),
        ]
    )
    ours, _ = dynamic_quantize(values, values.numel())  # one block: absmax 1
    kernel = [cuda_dquantize(code, np.float32(v)) for v in values.tolist()]
    assert ours.flatten()[: values.numel()].tolist() == kernel


@pytest.mark.parametrize("shape", [(128, 64), (7, 13), (300, 129), (5000,)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_trip_properties(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    weight = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
    single = nf4_roundtrip(weight, double_quant=False)
    double = nf4_roundtrip(weight)
    assert single.shape == double.shape == weight.shape and single.dtype == double.dtype == dtype

    flat = weight.reshape(-1).float()
    n = flat.numel()
    blocks = torch.nn.functional.pad(flat, (0, -n % 64)).view(-1, 64)
    absmax = blocks.abs().amax(1)
    # Without double quantization: each value is code * its block's absmax, the nearest such one,
    # and each block keeps its largest magnitude exactly (NF4 has both -1 and 1).
    ratio = torch.nn.functional.pad(single.reshape(-1).float(), (0, -n % 64)).view(-1, 64) / absmax[:, None]
    codes = NF4_CODE.to(dtype).float() if dtype != torch.float32 else NF4_CODE
    rounding = 1e-2 if dtype != torch.float32 else 1e-6
    assert float((ratio[..., None] - codes).abs().amin(-1).max()) < rounding
    scaled = blocks / absmax[:, None]
    nearest = NF4_CODE[(scaled[..., None] - NF4_CODE).abs().argmin(-1)] * absmax[:, None]
    torch.testing.assert_close(single.reshape(-1).float(), nearest.reshape(-1)[:n].to(dtype).float())
    largest = blocks.abs().argmax(1)
    single_blocks = torch.nn.functional.pad(single.reshape(-1).float(), (0, -n % 64)).view(-1, 64)
    assert torch.equal(
        single_blocks.gather(1, largest[:, None]).abs(), blocks.gather(1, largest[:, None]).abs()
    )
    # Idempotent: a round-tripped weight round-trips to itself.
    if dtype == torch.float32:
        assert torch.equal(nf4_roundtrip(single, double_quant=False), single)
    # Double quantization only adds the 8-bit error of each absmax: small next to NF4's own.
    error_single = float((single.float() - weight.float()).norm() / weight.float().norm())
    error_double = float((double.float() - weight.float()).norm() / weight.float().norm())
    assert 0.05 < error_single < 0.12
    assert abs(error_double - error_single) < 0.01


def test_round_trip_of_zeros_and_constant_blocks() -> None:
    zeros = torch.zeros(3, 100, dtype=torch.bfloat16)
    assert torch.equal(nf4_roundtrip(zeros), zeros)
    constant = torch.full((2, 64), 0.5)
    assert torch.equal(nf4_roundtrip(constant, double_quant=False), constant)


def test_against_bitsandbytes_where_it_imports() -> None:
    functional = pytest.importorskip("bitsandbytes.functional")
    gen = torch.Generator().manual_seed(2)
    for shape in [(256, 1024), (333, 77)]:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            weight = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
            q, state = functional.quantize_4bit(
                weight, blocksize=64, compress_statistics=False, quant_type="nf4"
            )
            assert torch.equal(
                nf4_roundtrip(weight, double_quant=False), functional.dequantize_4bit(q, state)
            )
            # With double quantization, given the same absmaxes the NF4 part is identical. The 8-bit
            # absmax codes are not compared here: bitsandbytes' CPU search differs from its CUDA
            # kernel (ported above), which is what QLoRA training ran.
            q, state = functional.quantize_4bit(
                weight, blocksize=64, compress_statistics=True, quant_type="nf4"
            )
            absmax = functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
            index, _ = nf4_quantize(weight.reshape(-1).float())
            ours = (NF4_CODE[index] * absmax[:, None]).reshape(-1)[: weight.numel()].to(dtype).reshape(shape)
            assert torch.equal(ours, functional.dequantize_4bit(q, state))


@pytest.mark.parametrize("shape", [(256, 512), (333, 77)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_double_quant_round_trip_equals_bitsandbytes_but_for_the_search(
    shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    """The whole double-quantized round trip against bitsandbytes' own (CPU backend): its mean
    offset, its 256-value statistics blocks, its 8-bit map, its dequantization. bitsandbytes' CPU
    code picks the nearest 8-bit code for each absmax, the CUDA search (what nf4_roundtrip ports)
    now and then the one beside it; so every 64-value block must equal bitsandbytes' block with
    that absmax code, or with the code one step away, and the latter stays rare."""
    functional = pytest.importorskip("bitsandbytes.functional")
    weight = (torch.randn(shape, generator=torch.Generator().manual_seed(4)) * 0.02).to(dtype)
    q, state = functional.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    stats = state.state2
    assert state.nested and stats.blocksize == 256
    blocks = state.absmax.numel()
    stats_absmax = stats.absmax.repeat_interleave(stats.blocksize)[:blocks]

    def per_block(tensor: torch.Tensor) -> torch.Tensor:
        flat = tensor.reshape(-1).float()
        return torch.nn.functional.pad(flat, (0, -flat.numel() % 64)).view(-1, 64)

    ours = per_block(nf4_roundtrip(weight))
    matches = {}
    for step in (0, -1, 1):
        code = (state.absmax.long() + step).clamp(0, 255)
        absmax = stats.code[code] * stats_absmax + state.offset
        plain = functional.QuantState(
            absmax=absmax.float(),
            shape=weight.shape,
            code=state.code,
            blocksize=64,
            quant_type="nf4",
            dtype=dtype,
        )
        matches[step] = (per_block(functional.dequantize_4bit(q, plain)) == ours).all(1)
    same = matches[0]
    beside = (matches[-1] | matches[1]) & ~same
    assert bool((same | beside).all()), f"{int((~(same | beside)).sum())} of {blocks} blocks differ"
    assert int(beside.sum()) <= max(2, blocks // 100), f"{int(beside.sum())} of {blocks} blocks one code away"


def test_round_trip_in_chunks_equals_the_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    weight = (torch.randn(301, 129, generator=torch.Generator().manual_seed(3)) * 0.02).to(torch.bfloat16)
    whole = nf4_roundtrip(weight)
    monkeypatch.setattr(limits, "CHUNK_VALUES", 128)  # 304 chunks, the last one short
    assert torch.equal(nf4_roundtrip(weight), whole)
