"""Compact, safetensors-compatible storage of quantized / binarized / pruned weights.

``pack`` turns one result into a flat ``dict[str, Tensor]`` of plain contiguous tensors
(no pickle; prefix the keys with the parameter name to put many weights in one
safetensors file). The format is told apart by its keys:

=========  =====================================================================
format     keys
=========  =====================================================================
codebook   ``codebook`` (G, 2**bits) float; ``indices`` uint8, ``bits`` per weight
sign       ``scales`` (G,) float; ``signs`` uint8, 1 bit per weight (1 = positive)
sparse     ``values`` (nnz,) float, the non-zeros in row-major order; ``mask`` uint8,
           1 bit per weight (1 = non-zero)
=========  =====================================================================

plus ``shape`` (int64, the weight's shape) in all three. Bit streams are little-endian
within a byte: value ``i`` occupies bits ``[i*bits, (i+1)*bits)`` of the stream, least
significant bit first, and bit ``j`` of the stream is bit ``j % 8`` of byte ``j // 8``;
the last byte is zero-padded.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from tshrink_plugins.quant.binarize import SignResult
from tshrink_plugins.quant.kmeans import MAX_BITS, KMeansResult

HEADER_KEYS = ("shape",)  # bookkeeping, not counted by bits_per_weight
FORMATS = {
    "codebook": ("codebook", "indices"),
    "sign": ("scales", "signs"),
    "sparse": ("values", "mask"),
}


def pack_bits(values: Tensor, bits: int) -> Tensor:
    """Pack integers in ``[0, 2**bits)`` (any shape, flattened) at ``bits`` bits each.

    Returns 1-D uint8 of length ``ceil(numel * bits / 8)``.
    """
    if not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in 1..{MAX_BITS}, got {bits!r}")
    v = values.flatten()  # (n,)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 2**bits):  # Python ints: no uint8 wrap-around
        raise ValueError(f"values must lie in [0, {2**bits}) to be packed at {bits} bits")
    v = v.to(torch.uint8)  # uint8 throughout: n * bits bytes of scratch, not 8x that
    shifts = torch.arange(bits, dtype=torch.uint8, device=v.device)
    stream = ((v[:, None] >> shifts) & 1).flatten()  # (n * bits,)
    pad = (-stream.numel()) % 8
    stream = torch.cat([stream, stream.new_zeros(pad)]).reshape(-1, 8)  # (bytes, 8)
    place = torch.arange(8, dtype=torch.uint8, device=v.device)
    return (stream << place).sum(dim=1, dtype=torch.uint8)  # distinct bits: the sum cannot overflow


def unpack_bits(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of ``pack_bits``: the first ``count`` values, 1-D uint8."""
    if not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in 1..{MAX_BITS}, got {bits!r}")
    if packed.dtype != torch.uint8 or packed.ndim != 1:
        raise ValueError(f"packed must be 1-D uint8, got {packed.dtype} with shape {tuple(packed.shape)}")
    if packed.numel() != math.ceil(count * bits / 8):
        raise ValueError(
            f"{packed.numel()} bytes cannot hold exactly {count} values of {bits} bits "
            f"(expected {math.ceil(count * bits / 8)})"
        )
    place = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed[:, None] >> place) & 1).flatten()[: count * bits]  # (count * bits,)
    return (stream.reshape(count, bits) << place[:bits]).sum(dim=1, dtype=torch.uint8)


def _shape_tensor(shape: torch.Size) -> Tensor:
    return torch.tensor(list(shape), dtype=torch.int64)


def pack(result: KMeansResult | SignResult | Tensor) -> dict[str, Tensor]:
    """Compact storage of a ``KMeansResult``, a ``SignResult`` or a pruned dense tensor.

    A plain tensor is stored sparse (bitmask + non-zero values); this is only smaller
    than dense when enough weights are zero (below ~97 % density for fp32).
    """
    if isinstance(result, KMeansResult):
        return {
            "codebook": result.codebook.detach().contiguous(),
            "indices": pack_bits(result.indices, result.bits),
            "shape": _shape_tensor(result.shape),
        }
    if isinstance(result, SignResult):
        return {
            "scales": result.scales.detach().contiguous(),
            "signs": pack_bits(result.signs, 1),
            "shape": _shape_tensor(result.shape),
        }
    if isinstance(result, Tensor):
        if result.ndim == 0 or not result.is_floating_point():
            raise ValueError(f"a dense weight must be a floating tensor with >= 1 dim, got {result.dtype} {tuple(result.shape)}")
        W = result.detach()
        nonzero = W != 0
        return {
            "values": W[nonzero].contiguous(),  # (nnz,), row-major order
            "mask": pack_bits(nonzero, 1),
            "shape": _shape_tensor(W.shape),
        }
    raise ValueError(f"pack accepts KMeansResult, SignResult or Tensor, got {type(result).__name__}")


def packed_format(packed: dict[str, Tensor]) -> str:
    """Which format (``"codebook"``, ``"sign"`` or ``"sparse"``) a packed dict holds."""
    keys = set(packed) - set(HEADER_KEYS)
    for name, fmt_keys in FORMATS.items():
        if keys == set(fmt_keys):
            if "shape" not in packed:
                raise ValueError(f"packed {name} weight lacks the 'shape' entry")
            return name
    raise ValueError(
        f"unknown packed keys {sorted(packed)}; expected 'shape' plus one of "
        + ", ".join(f"{list(v)} ({k})" for k, v in FORMATS.items())
    )


def unpack(packed: dict[str, Tensor]) -> Tensor:
    """Rebuild the dense weight from ``pack``'s output (exactly ``result.dequantize()``)."""
    fmt = packed_format(packed)
    shape = torch.Size(packed["shape"].tolist())
    n = shape.numel()
    if fmt == "codebook":
        codebook = packed["codebook"]  # (G, K)
        bits = codebook.shape[1].bit_length() - 1
        indices = unpack_bits(packed["indices"], bits, n).to(torch.uint8).reshape(shape)
        return KMeansResult(codebook=codebook, indices=indices).dequantize()
    if fmt == "sign":
        signs = unpack_bits(packed["signs"], 1, n).bool().reshape(shape)
        return SignResult(signs=signs, scales=packed["scales"]).dequantize()
    values = packed["values"]  # (nnz,)
    nonzero = unpack_bits(packed["mask"], 1, n).bool()  # (n,)
    if int(nonzero.sum()) != values.numel():
        raise ValueError(f"mask marks {int(nonzero.sum())} non-zeros but {values.numel()} values are stored")
    W = values.new_zeros(n)
    W[nonzero] = values
    return W.reshape(shape)


def bits_per_weight(packed: dict[str, Tensor]) -> float:
    """Storage per weight in bits: all payload bytes (codebook/scales/values + packed
    indices/signs/mask) times 8, divided by the number of weights. The ``shape`` header
    (8 bytes per dim) is not counted."""
    packed_format(packed)
    n = torch.Size(packed["shape"].tolist()).numel()
    nbytes = sum(t.numel() * t.element_size() for k, t in packed.items() if k not in HEADER_KEYS)
    return 8 * nbytes / n
