"""NumPy implementations of the MIL (Core ML ML program) operations the project's exports contain.

Each function takes the op's inputs as keyword arguments (NumPy arrays, or Python/NumPy
scalars for constant parameters, exactly as the MIL op definitions in coremltools name
them) and returns the op's output array. Semantics follow the op definitions in
``coremltools/converters/mil/mil/ops/defs`` (iOS15/iOS16 opsets); tensors are NCHW.

Dtype rules -- the point of this module is that an fp16 program is computed in fp16:

* Elementwise ops on fp16 tensors return fp16. NumPy evaluates an fp16 ufunc in fp32 and
  rounds once to fp16, which for + - * / is the correctly rounded IEEE fp16 result.
* ``conv`` and the bilinear upsample multiply fp16 inputs and accumulate in fp32, then
  round the result once to fp16. (A product of two fp16 numbers is exact in fp32; Core ML's
  GPU and Neural Engine also accumulate wider than fp16, in an order we cannot reproduce,
  so a last-bit difference per output is expected -- the tolerance tables allow for it.)
* Weight decompression (``constexpr_*``) produces the dtype of its scale / lookup table.
* Activation quantization (iOS17 ``quantize`` / ``dequantize``, what ``w8a8`` programs insert
  around convolutions): ``x / scale`` in fp32, rounded half to even, plus the zero point, clipped
  to the integer type; back as ``(q - zero_point) * scale`` in fp32, rounded once to the
  scale's dtype.

Two paths (:func:`op_table`): ``exact`` (:data:`OPS`: each convolution a sum over kernel taps
of per-tap matrix products, bilinear resampling by gathering the two neighbours) and ``fast``,
the default and what the parity gate runs (:data:`FAST_OVERRIDES`: ``conv`` through ONNX
Runtime's float32 convolution (:mod:`runtime_py.mil_kernels`); ``upsample_bilinear`` as two
interpolation-matrix products; ``elu`` through ``exp`` instead of ``expm1``). Both compute in fp32
and round once to the program's dtype at the end of each op, so they differ by fp32 rounding only
(measured bounds: tests/test_mil_executor.py, tests/test_coreml_export.py).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from .mil_kernels import conv2d_float32, to_float16, to_float32

OPS: Dict[str, Callable[..., np.ndarray]] = {}


def mil_op(name: str):
    def register(fn):
        OPS[name] = fn
        return fn

    return register


def _np_dtype(mil_dtype: str) -> np.dtype:
    table = {"fp16": np.float16, "fp32": np.float32, "int32": np.int32, "int8": np.int8,
             "uint8": np.uint8, "bool": np.bool_, "int16": np.int16, "uint16": np.uint16}
    if mil_dtype not in table:
        raise ValueError(f"cast to unsupported dtype {mil_dtype!r}")
    return np.dtype(table[mil_dtype])


def _as_array(x) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else np.asarray(x)


# ------------------------------------------------------------------------ elementwise

def _binary(fn, x, y):
    x, y = _as_array(x), _as_array(y)
    if x.dtype != y.dtype:
        raise TypeError(f"operands have different dtypes ({x.dtype} vs {y.dtype}); MIL requires equal dtypes")
    return fn(x, y).astype(x.dtype, copy=False)


def _binary_op(fn):
    def op(x, y):
        return _binary(fn, x, y)

    return op


add = mil_op("add")(_binary_op(np.add))
sub = mil_op("sub")(_binary_op(np.subtract))
mul = mil_op("mul")(_binary_op(np.multiply))
real_div = mil_op("real_div")(_binary_op(np.true_divide))
maximum = mil_op("maximum")(_binary_op(np.maximum))
minimum = mil_op("minimum")(_binary_op(np.minimum))


@mil_op("cast")
def cast(x, dtype):
    x = _as_array(x)
    target = _np_dtype(str(dtype))
    if np.issubdtype(target, np.integer) and np.issubdtype(x.dtype, np.floating):
        x = np.trunc(x)  # MIL cast float -> int truncates toward zero
    return x.astype(target)


@mil_op("clip")
def clip(x, alpha, beta):
    x = _as_array(x)
    lo, hi = np.asarray(alpha, x.dtype), np.asarray(beta, x.dtype)
    return np.minimum(np.maximum(x, lo), hi)


def _elu_fp32(xf: np.ndarray, alpha, expm1_inplace) -> np.ndarray:
    # max(x,0) + alpha*expm1(min(x,0)): exactly x for x > 0 (expm1(0) = 0), in place, no masks
    neg = np.minimum(xf, 0)
    expm1_inplace(neg)
    neg *= np.float32(alpha)
    np.maximum(xf, 0, out=xf)
    xf += neg
    return xf


# fp16 ELU results for all 65,536 fp16 bit patterns, per (expm1 variant, alpha): an fp16 program's elu is
# then one table lookup per value (8x faster than exp in fp32 at 512x680, 43 elus a run), bit for bit
# what the fp32 evaluation rounded to fp16 gives, because each entry is that evaluation.
_FP16_ELU_TABLES: Dict[Tuple[str, float], np.ndarray] = {}


def _fp16_elu_table(alpha, expm1_inplace, variant: str) -> np.ndarray:
    key = (variant, float(np.float32(alpha)))
    table = _FP16_ELU_TABLES.get(key)
    if table is None:
        every_half = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
        with np.errstate(invalid="ignore", over="ignore"):  # the NaN and infinity patterns
            table = _elu_fp32(every_half.astype(np.float32), alpha, expm1_inplace).astype(np.float16)
        table.flags.writeable = False
        _FP16_ELU_TABLES[key] = table
    return table


def _elu_with(x, alpha, expm1_inplace, variant: str):
    x = _as_array(x)
    if x.dtype == np.float16:
        return np.asarray(np.take(_fp16_elu_table(alpha, expm1_inplace, variant), x.view(np.uint16)))
    return _elu_fp32(x.astype(np.float32), alpha, expm1_inplace).astype(x.dtype)


def _expm1_inplace(v: np.ndarray) -> None:
    np.expm1(v, out=v)


def _exp_minus_one_inplace(v: np.ndarray) -> None:
    np.exp(v, out=v)
    v -= np.float32(1)


@mil_op("elu")
def elu(x, alpha=1.0):
    """``x`` where x > 0, else ``alpha * (exp(x) - 1)``; evaluated in fp32, rounded once to x's dtype
    (fp16 x: read from a table of that evaluation over every fp16 value)."""
    return _elu_with(x, alpha, _expm1_inplace, "expm1")


def elu_exp(x, alpha=1.0):
    """:func:`elu` with ``exp(x) - 1`` (SIMD in NumPy) for ``expm1(x)`` (scalar, ~5x slower): for x near 0
    the fp32 result is off by up to ~6e-8 absolute, an fp16 ulp only where |x| < 2**-14."""
    return _elu_with(x, alpha, _exp_minus_one_inplace, "exp")


@mil_op("round")
def round_(x):
    """Nearest integer, ties to even (the definition's example: 0.5 -> 0)."""
    x = _as_array(x)
    return np.round(x).astype(x.dtype)


@mil_op("floor")
def floor(x):
    x = _as_array(x)
    return np.floor(x).astype(x.dtype)


@mil_op("fill_like")
def fill_like(ref_tensor, value=0.0):
    value = _as_array(value)
    return np.full(_as_array(ref_tensor).shape, value, dtype=value.dtype)


@mil_op("identity")
def identity(x):
    return _as_array(x).copy()


# ------------------------------------------------------------------------ tensor ops

@mil_op("concat")
def concat(values: Sequence[np.ndarray], axis, interleave=False):
    values = [_as_array(v) for v in values]
    if len({v.dtype for v in values}) != 1:
        raise TypeError(f"concat of mixed dtypes {[str(v.dtype) for v in values]}")
    if bool(interleave):
        # interleave: take one slice from each input in turn along axis
        stacked = np.stack(values, axis=int(axis) + 1)
        shape = list(values[0].shape)
        shape[int(axis)] *= len(values)
        return stacked.reshape(shape)
    return np.concatenate(values, axis=int(axis))


@mil_op("pad")
def pad(x, pad, mode="constant", constant_val=0.0):
    """Pad the last len(pad)//2 dims; ``pad`` lists (before, after) per dim, outermost padded dim first."""
    x = _as_array(x)
    pairs = np.asarray(pad, dtype=np.int64).reshape(-1, 2)
    widths = [(0, 0)] * (x.ndim - len(pairs)) + [tuple(int(v) for v in p) for p in pairs]
    mode = str(mode)
    if mode == "constant":
        return np.pad(x, widths, mode="constant", constant_values=np.asarray(constant_val, x.dtype))
    if mode == "reflect":
        for axis, (before, after) in enumerate(widths):
            if max(before, after) > x.shape[axis] - 1:
                raise ValueError(f"reflect pad {before},{after} too large for dim of size {x.shape[axis]}")
        return np.pad(x, widths, mode="reflect")
    if mode == "replicate":
        return np.pad(x, widths, mode="edge")
    raise ValueError(f"pad mode {mode!r} is not one of constant, reflect, replicate")


# ------------------------------------------------------------------------ convolution

def conv_padding(pad_type: str, pad: Optional[Sequence[int]], kernel: Sequence[int],
                 dilations: Sequence[int]) -> list:
    """(before, after) zero padding per spatial dim, as the MIL ``conv`` definition specifies."""
    pad_type = str(pad_type)
    dims = len(kernel)
    if pad_type == "valid":
        return [(0, 0)] * dims
    if pad_type == "custom":
        p = [int(v) for v in (pad if pad is not None else [0] * 2 * dims)]
        return [(p[2 * i], p[2 * i + 1]) for i in range(dims)]
    if pad_type in ("same", "same_lower"):
        out = []
        for k, d in zip(kernel, dilations):
            dk = (int(k) - 1) * int(d) + 1
            if dk % 2:
                out.append((dk // 2, dk // 2))
            else:
                big, small = math.ceil((dk - 1) / 2), (dk - 1) // 2
                out.append((big, small) if pad_type == "same" else (small, big))
        return out
    raise ValueError(f"conv pad_type {pad_type!r} is not one of valid, custom, same, same_lower")


@mil_op("conv")
def conv(x, weight, bias=None, strides=None, pad_type="valid", pad=None, dilations=None, groups=1):
    """2-D convolution, NCHW input, weight (C_out, C_in/groups, KH, KW).

    Products and sums in fp32 (fp16 inputs are exact in fp32), one rounding to x's dtype at
    the end, after the bias is added.
    """
    x, weight = _as_array(x), _as_array(weight)
    if x.ndim != 4:
        raise ValueError(f"conv: only 2-D convolution is implemented (x has rank {x.ndim})")
    out_dtype = x.dtype
    n, cin, _, _ = x.shape
    cout, cin_g, kh, kw = weight.shape
    groups = int(groups)
    strides = [int(s) for s in (strides if strides is not None else (1, 1))]
    dilations = [int(d) for d in (dilations if dilations is not None else (1, 1))]
    if cin != cin_g * groups or cout % groups:
        raise ValueError(f"conv: channels {cin} -> {cout} do not divide into {groups} groups with weight {weight.shape}")
    (pt, pb), (pl, pr) = conv_padding(pad_type, pad, (kh, kw), dilations)
    sh, sw = strides
    dh, dw = dilations
    # one extra zero row at the bottom lets the stride-1 path read whole padded rows
    xp = np.pad(x.astype(np.float32), ((0, 0), (0, 0), (pt, pb + 1), (pl, pr)))
    hp, wp = xp.shape[2] - 1, xp.shape[3]
    ho = (hp - ((kh - 1) * dh + 1)) // sh + 1
    wo = (wp - ((kw - 1) * dw + 1)) // sw + 1
    # taps first and contiguous: each (cout, cin) tap matrix must be unit-stride for BLAS,
    # a strided slice of the OIHW weight would send matmul down NumPy's slow generic loop
    w32 = np.ascontiguousarray(weight.astype(np.float32).transpose(2, 3, 0, 1))
    cout_g = cout // groups
    y = np.empty((n, cout, ho, wo), np.float32)
    for b in range(n):
        for g in range(groups):
            xs = xp[b, g * cin_g:(g + 1) * cin_g]
            wg = w32[:, :, g * cout_g:(g + 1) * cout_g]
            if sh == 1 and sw == 1:
                # Each tap multiplies a contiguous run of whole padded rows; the columns past
                # wo in each row are junk and are cropped at the end (no im2col copy).
                flat = xs.reshape(cin_g, -1)
                acc = np.zeros((cout_g, ho * wp), np.float32)
                for i in range(kh):
                    for j in range(kw):
                        start = i * dh * wp + j * dw
                        acc += wg[i, j] @ flat[:, start:start + ho * wp]
                y[b, g * cout_g:(g + 1) * cout_g] = acc.reshape(cout_g, ho, wp)[:, :, :wo]
            else:
                acc = np.zeros((cout_g, ho * wo), np.float32)
                for i in range(kh):
                    for j in range(kw):
                        patch = xs[:, i * dh: i * dh + (ho - 1) * sh + 1: sh, j * dw: j * dw + (wo - 1) * sw + 1: sw]
                        acc += wg[i, j] @ patch.reshape(cin_g, -1)
                y[b, g * cout_g:(g + 1) * cout_g] = acc.reshape(cout_g, ho, wo)
    if bias is not None:
        y += _as_array(bias).astype(np.float32).reshape(1, -1, 1, 1)
    return y.astype(out_dtype)


#: float32 bytes of input one fast-path convolution call widens at a time: a wider input is convolved in
#: bands of output rows, each from its own rows of the input. ONNX Runtime holds a reordered copy of its
#: input, so the 208-channel layer at 1024x1360 in one call (a 1,105 MiB float32 input) raised the
#: executor's peak by about 1 GiB over the im2col path it replaced (docs/COREML.md, "Executor memory").
FAST_CONV_BAND_BYTES = 256 << 20


def conv_fast(x, weight, bias=None, strides=None, pad_type="valid", pad=None, dilations=None, groups=1,
              band_bytes: int = FAST_CONV_BAND_BYTES):
    """:func:`conv` through ONNX Runtime's float32 convolution (:mod:`runtime_py.mil_kernels`).

    Same inputs, layouts and dtype rule as :func:`conv` (fp32 products and sums, one rounding to
    x's dtype after the bias); only the order of the fp32 additions differs. An input wider than
    ``band_bytes`` in float32 is convolved in bands of output rows (each output is still one sum).
    """
    x, weight = _as_array(x), _as_array(weight)
    if x.ndim != 4:
        raise ValueError(f"conv: only 2-D convolution is implemented (x has rank {x.ndim})")
    n, cin, h, w = x.shape
    cout, cin_g, kh, kw = weight.shape
    groups = int(groups)
    sh, sw = [int(s) for s in (strides if strides is not None else (1, 1))]
    dh, dw = [int(d) for d in (dilations if dilations is not None else (1, 1))]
    if cin != cin_g * groups or cout % groups:
        raise ValueError(f"conv: channels {cin} -> {cout} do not divide into {groups} groups with weight {weight.shape}")
    (pt, pb), (pl, pr) = conv_padding(pad_type, pad, (kh, kw), (dh, dw))
    ho = (h + pt + pb - ((kh - 1) * dh + 1)) // sh + 1
    wo = (w + pl + pr - ((kw - 1) * dw + 1)) // sw + 1
    w32 = weight.astype(np.float32)
    b32 = np.zeros(cout, np.float32) if bias is None else _as_array(bias).astype(np.float32)

    def narrow(y32):
        return to_float16(y32) if x.dtype == np.float16 else y32.astype(x.dtype, copy=False)

    band = max(1, band_bytes // (4 * n * cin * w * sh))  # output rows per call
    if band >= ho:
        return narrow(conv2d_float32(to_float32(x), w32, b32, (pt, pl, pb, pr), (sh, sw), (dh, dw), groups, (ho, wo)))
    y = np.empty((n, cout, ho, wo), x.dtype)
    for o0 in range(0, ho, band):
        o1 = min(ho, o0 + band)
        top, bottom = o0 * sh - pt, (o1 - 1) * sh - pt + (kh - 1) * dh + 1  # input rows the band reads
        src0, src1 = max(top, 0), min(bottom, h)
        if src1 <= src0:  # the band reads padding only
            y[:, :, o0:o1] = narrow(np.broadcast_to(b32.reshape(1, -1, 1, 1), (n, cout, o1 - o0, wo)))
            continue
        y[:, :, o0:o1] = narrow(conv2d_float32(to_float32(x[:, :, src0:src1]), w32, b32,
                                               (src0 - top, pl, bottom - src1, pr), (sh, sw), (dh, dw), groups,
                                               (o1 - o0, wo)))
    return y


# ------------------------------------------------------------------------ resampling

@mil_op("upsample_nearest_neighbor")
def upsample_nearest_neighbor(x, scale_factor_height=1, scale_factor_width=1):
    """Output size floor(H*s); output row i reads input row floor(i / s) (pixel duplication for integer s)."""
    x = _as_array(x)
    h, w = x.shape[-2:]
    ho, wo = int(math.floor(h * float(scale_factor_height))), int(math.floor(w * float(scale_factor_width)))
    sh, sw = float(scale_factor_height), float(scale_factor_width)
    if sh.is_integer() and sw.is_integer() and (ho, wo) == (h * int(sh), w * int(sw)):
        # each pixel an sh x sw block: one contiguous copy (the gathers below leave a strided
        # result that the next convolution would copy again)
        lead = x.shape[:-2]
        blocks = np.broadcast_to(x[..., :, None, :, None], (*lead, h, int(sh), w, int(sw)))
        return blocks.reshape(*lead, ho, wo)
    rows = np.minimum(np.floor(np.arange(ho) / sh).astype(np.int64), h - 1)
    cols = np.minimum(np.floor(np.arange(wo) / sw).astype(np.int64), w - 1)
    return x[..., rows, :][..., :, cols]


def _linear_grid(n_in: int, n_out: int, align_corners: bool, half_pixel_centers: bool):
    """Source coordinate of each output sample along one axis, as the MIL upsample_bilinear notes define it."""
    i = np.arange(n_out, dtype=np.float64)
    if align_corners:
        spacing = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        pos = i * spacing
    elif half_pixel_centers:
        spacing = n_in / n_out
        pos = i * spacing + 0.5 * spacing - 0.5
    else:
        pos = i * (n_in / n_out)
    pos = np.clip(pos, 0, n_in - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (pos - lo).astype(np.float32)
    return lo, hi, frac


def _bilinear(x: np.ndarray, ho: int, wo: int, align_corners: bool, half_pixel_centers: bool) -> np.ndarray:
    out_dtype = x.dtype
    xf = x.astype(np.float32)
    h, w = x.shape[-2:]
    r0, r1, fr = _linear_grid(h, ho, align_corners, half_pixel_centers)
    c0, c1, fc = _linear_grid(w, wo, align_corners, half_pixel_centers)
    fr = fr[:, None]
    rows = xf[..., r0, :] * (1 - fr) + xf[..., r1, :] * fr
    y = rows[..., c0] * (1 - fc) + rows[..., c1] * fc
    return y.astype(out_dtype)


def _interpolation_matrix(n_in: int, n_out: int, align_corners: bool, half_pixel_centers: bool) -> np.ndarray:
    """(n_out, n_in) float32: row o holds the two weights of :func:`_linear_grid`'s neighbours of o."""
    lo, hi, frac = _linear_grid(n_in, n_out, align_corners, half_pixel_centers)
    m = np.zeros((n_out, n_in), np.float32)
    rows = np.arange(n_out)
    m[rows, lo] += 1 - frac
    m[rows, hi] += frac
    return m


def upsample_bilinear_matmul(x, scale_factor_height=1, scale_factor_width=1, align_corners=True,
                             half_pixel_centers=None):
    """:func:`upsample_bilinear` as two float32 BLAS products per tensor, (rows x H) @ x @ (W x cols),
    with the same grid and weights; one rounding to x's dtype. Each output is the same two-term
    weighted sum (the other products are exact zeros) in another fp32 evaluation order."""
    x = _as_array(x)
    h, w = x.shape[-2:]
    ho, wo = int(math.floor(h * float(scale_factor_height))), int(math.floor(w * float(scale_factor_width)))
    align_corners = bool(align_corners)
    hpc = (not align_corners) if half_pixel_centers is None else bool(half_pixel_centers)
    rows = _interpolation_matrix(h, ho, align_corners, hpc)
    cols = _interpolation_matrix(w, wo, align_corners, hpc).T.copy()
    lead = x.shape[:-2]
    wide = to_float32(x).reshape(-1, w) @ cols                # (..., H, Wo) as one product
    y = np.matmul(rows, wide.reshape(-1, h, wo)).reshape(*lead, ho, wo)  # one product per channel
    return to_float16(y) if x.dtype == np.float16 else y.astype(x.dtype)


@mil_op("upsample_bilinear")
def upsample_bilinear(x, scale_factor_height=1, scale_factor_width=1, align_corners=True, half_pixel_centers=None):
    """Bilinear upsample to floor(H*s) x floor(W*s); interpolated in fp32, rounded once to x's dtype."""
    x = _as_array(x)
    h, w = x.shape[-2:]
    ho, wo = int(math.floor(h * float(scale_factor_height))), int(math.floor(w * float(scale_factor_width)))
    align_corners = bool(align_corners)
    hpc = (not align_corners) if half_pixel_centers is None else bool(half_pixel_centers)
    return _bilinear(x, ho, wo, align_corners, hpc)


@mil_op("resize_bilinear")
def resize_bilinear(x, target_size_height=1, target_size_width=1, sampling_mode="DEFAULT"):
    """Bilinear resize to a target size; sampling modes ALIGN_CORNERS, STRICT_ALIGN_CORNERS, DEFAULT, OFFSET_CORNERS, UNALIGN_CORNERS."""
    x = _as_array(x)
    mode = str(sampling_mode)
    ho, wo = int(target_size_height), int(target_size_width)
    if mode in ("ALIGN_CORNERS", "STRICT_ALIGN_CORNERS"):
        return _bilinear(x, ho, wo, True, False)
    if mode == "UNALIGN_CORNERS":
        return _bilinear(x, ho, wo, False, True)
    if mode == "DEFAULT":
        return _bilinear(x, ho, wo, False, False)
    raise ValueError(f"resize_bilinear sampling_mode {mode!r} is not implemented")


# ------------------------------------------------------------------------ activation quantization

def _along(v: np.ndarray, ndim: int, axis) -> np.ndarray:
    """A scale or zero point broadcast against a rank-``ndim`` tensor: scalar, or a vector along ``axis``."""
    v = _as_array(v)
    if v.ndim == 0 or v.size == 1:
        return v.reshape(())
    shape = [1] * ndim
    shape[int(axis) % ndim] = v.size
    return v.reshape(shape)


@mil_op("quantize")
def quantize(input, scale, zero_point=None, axis=None, output_dtype="int8"):
    """iOS17 quantize: clip(round_half_even(input / scale) + zero_point) to int8 / uint8."""
    x = _as_array(input)
    target = _np_dtype(str(output_dtype))
    info = np.iinfo(target)
    q = np.rint(x.astype(np.float32) / _along(scale, x.ndim, axis).astype(np.float32))
    if zero_point is not None:
        q += _along(zero_point, x.ndim, axis).astype(np.float32)
    return np.clip(q, info.min, info.max).astype(target)


@mil_op("dequantize")
def dequantize(input, scale, zero_point=None, axis=None):
    """iOS17 dequantize: (input - zero_point) * scale, in the scale's dtype."""
    q = _as_array(input).astype(np.float32)
    scale = _as_array(scale)
    if zero_point is not None:
        q -= _along(zero_point, q.ndim, axis).astype(np.float32)
    return (q * _along(scale, q.ndim, axis).astype(np.float32)).astype(scale.dtype)


# ------------------------------------------------------------------------ weight decompression

@mil_op("constexpr_affine_dequantize")
def constexpr_affine_dequantize(quantized_data, zero_point, scale, axis):
    """``scale * (quantized_data - zero_point)``; vector scale / zero point run along ``axis``. Output dtype = scale's."""
    q = _as_array(quantized_data)
    scale, zero_point = _as_array(scale), _as_array(zero_point)
    shape = [1] * q.ndim

    def along_axis(v):
        if v.ndim == 0:
            return v
        s = list(shape)
        s[int(axis)] = v.size
        return v.reshape(s)

    deq = (q.astype(np.float32) - along_axis(zero_point).astype(np.float32)) * along_axis(scale).astype(np.float32)
    return deq.astype(scale.dtype)


def unpack_lsb_first(packed: np.ndarray, nbits: int, count: int) -> np.ndarray:
    """Indices packed LSB-first across bytes (constexpr_lut_to_dense's layout) -> uint32 array of ``count`` values."""
    bits = np.unpackbits(_as_array(packed).astype(np.uint8), bitorder="little")[: nbits * count]
    bits = bits.reshape(count, nbits).astype(np.uint32)
    return (bits << np.arange(nbits, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)


@mil_op("constexpr_lut_to_dense")
def constexpr_lut_to_dense(indices, lut, shape):
    """iOS16 palettization: dense[k] = lut[index_k], indices n_bits = log2(len(lut)) packed LSB-first, row-major."""
    lut = _as_array(lut)
    shape = [int(s) for s in _as_array(shape)]
    nbits = int(round(math.log2(lut.shape[0])))
    if 2 ** nbits != lut.shape[0]:
        raise ValueError(f"lookup table size {lut.shape[0]} is not a power of two")
    count = int(np.prod(shape))
    return lut[unpack_lsb_first(indices, nbits, count)].reshape(shape)


#: ops the fast path computes differently (see the module docstring); every other op is shared
FAST_OVERRIDES: Dict[str, Callable[..., np.ndarray]] = {"conv": conv_fast, "upsample_bilinear": upsample_bilinear_matmul,
                                                         "elu": elu_exp}
EXECUTOR_MODES = ("fast", "exact")


def op_table(mode: str = "fast") -> Dict[str, Callable[..., np.ndarray]]:
    """The implementations the executor runs: ``exact`` (:data:`OPS`) or ``fast`` (OPS with :data:`FAST_OVERRIDES`)."""
    if mode not in EXECUTOR_MODES:
        raise ValueError(f"executor mode {mode!r} is not one of {', '.join(EXECUTOR_MODES)}")
    return OPS if mode == "exact" else {**OPS, **FAST_OVERRIDES}
