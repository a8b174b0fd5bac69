"""Which int8 products ONNX Runtime's CPU kernels compute exactly on this machine, and how to make them exact.

On x86 CPUs without VNNI (AVX2 or AVX-512F only, e.g. AMD Zen 2/3, Intel
before Ice Lake), MLAS multiplies uint8 activations by int8 weights with
``vpmaddubsw``, which adds each pair of products in a saturating int16: a
pair of 255 x 127 products (64770) clips at 32767. The model's QDQ
semantics, VNNI CPUs, ARM and NPUs compute those sums exactly. The session
option ``session.x64quantprecision=1`` makes ONNX Runtime convert int8
weights to uint8 (+128) on such CPUs, so its U8U8 kernels sum exactly:
the same numbers, at U8U8 speed. hybridq's own measurements (analyze,
proposal) use it where the CPU needs it (``exact_int8`` of
:func:`hybridq._runtime.session`), so their figures do not depend on the
machine they run on.
"""

from __future__ import annotations

import functools
import platform
from collections.abc import Iterator, Mapping

import onnx
from onnx import TensorProto

from ._onnx import subgraphs

X64_PRECISION_KEY = "session.x64quantprecision"
"""ONNX Runtime session config key (``kOrtSessionOptionsAvx2PrecisionMode``)."""

_X86 = frozenset({"x86_64", "amd64", "i386", "i686", "x86"})
_VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def is_x86() -> bool:
    """Is this an x86 machine (where ORT's int8 Q/DQ pairs become uint8 and U8S8 may saturate)?"""
    return platform.machine().lower() in _X86


@functools.lru_cache(maxsize=1)
def u8s8_saturates() -> bool:
    """Do ONNX Runtime's default U8S8 kernels saturate on this CPU (x86 without VNNI)?"""
    return saturates(platform.machine(), _cpu_flags())


def saturates(machine: str, flags: set[str] | None) -> bool:
    """:func:`u8s8_saturates` for a machine name and its CPU flags (None: unknown, counts as saturating on x86).

    Unknown flags only cost speed: the exact kernels are used.
    """
    return machine.lower() in _X86 and not (flags is not None and _VNNI_FLAGS & flags)


def _cpu_flags() -> set[str] | None:
    """The CPU flags of ``/proc/cpuinfo`` (Linux), or None."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


INT8_WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {
    "MatMulInteger": (1,),
    "QLinearMatMul": (3,),
    "QLinearConv": (3,),
    "QGemm": (3,),
    "MatMulIntegerToFloat": (1,),
    "DynamicQuantizeMatMul": (1,),
    "QAttention": (1,),
    "DynamicQuantizeLSTM": (1, 2),
}
"""ONNX Runtime's integer kernels that multiply uint8 activations by an int8 weight (U8S8) when the weight, at these
inputs, is int8: the ops its x86 rewrite ``session.x64quantprecision`` converts (ConvInteger takes no int8 weight).
A QDQ model's int8 products come from a DequantizeLinear of an 8-bit weight, which ORT fuses into these kernels."""


def int8_product_nodes(model: onnx.ModelProto, types: Mapping[str, int] | None = None) -> list[str]:
    """The nodes of ``model`` (subgraphs too) a plain ONNX Runtime session runs as int8 products: a DequantizeLinear of
    a constant 8-bit weight, or a kernel of :data:`INT8_WEIGHT_INPUTS` whose weight is int8 (``types``: element types
    known beyond the constants, by tensor name)."""
    known = dict(types or {})
    constants: dict[str, int] = {}
    for g in _graphs(model.graph):
        constants.update((i.name, i.data_type) for i in g.initializer)
        constants.update((n.output[0], a.t.data_type) for n in g.node if n.op_type == "Constant" and n.output
                         for a in n.attribute if a.name == "value")
    known.update(constants)
    eight = (TensorProto.INT8, TensorProto.UINT8)
    found = []
    for g in _graphs(model.graph):
        for n in g.node:
            if n.op_type == "DequantizeLinear" and n.input and constants.get(n.input[0]) in eight:
                found.append(n.name or n.output[0])
            elif any(k < len(n.input) and known.get(n.input[k]) == TensorProto.INT8 for k in INT8_WEIGHT_INPUTS.get(n.op_type, ())):
                found.append(n.name or n.output[0])
    return found


def _graphs(g: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``g`` and every graph inside its nodes, depth first."""
    yield g
    for n in g.node:
        for sg in subgraphs(n):
            yield from _graphs(sg)


SATURATION_NOTE = (
    "this CPU is x86 without VNNI: ONNX Runtime's default int8 kernels add pairs of products in a "
    "saturating int16 here, so a plain session on it may give less accurate outputs than these "
    "figures, which use exact int8 products (as VNNI and ARM CPUs and NPUs compute them). To deploy on "
    f"such CPUs, set the session option {X64_PRECISION_KEY}=1 (exact, slower kernels); "
    "`hybridq analyze --host-int8` measures the default kernels"
)
"""What analyze tells a user on such a CPU."""

NOT_EXACT_NOTE = (
    "ONNX Runtime cannot make this model's int8 products exact on this CPU (its "
    f"{X64_PRECISION_KEY} rewrite fails on the model): the figures are from this CPU's default, "
    "saturating int8 kernels"
)
"""What analyze says when :func:`hybridq._runtime.session` fell back to the default kernels."""
