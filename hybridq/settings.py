"""Global quantization settings: typed, with defaults, one-to-one with the cfg's `settings:` block."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import ConfigError, did_you_mean
from .observers import ALGORITHM_ALIASES, ALGORITHMS
from .qparams import normalize_dtype

DEFAULT_QUANTIZE_OPS = ("Conv", "Gemm", "MatMul", "LSTM")  # LSTM: int8 weights via DynamicQuantizeLSTM (recurrent.py)

ACTIVATION_DTYPES = ("uint8", "int8", "int16", "uint16")
WEIGHT_DTYPES = ("int8", "int16")
QTYPES = ("asym", "sym")
COST_MODELS = ("measured", "macs")
QMETHODS = ("channel", "layer")
TARGET_NAMES = ("cpu", "npu")  # the keys of targets.TARGETS (settings cannot import it: targets imports the plan)
_QTYPE_ALIASES = {"asymmetric": "asym", "symmetric": "sym"}

_CHOICES: dict[str, tuple[tuple[str, ...], str]] = {
    "dtype": (ACTIVATION_DTYPES, "uint8, int8 or int16"),
    "weight_dtype": (WEIGHT_DTYPES, "int8 or int16"),
    "qtype": (QTYPES, "asym or sym"),
    "qmethod": (QMETHODS, "channel or layer"),
    "algorithm": (tuple(ALGORITHMS), ", ".join(ALGORITHMS) + " (RKNN-Toolkit2's names are read too: "
                  + ", ".join(f"{k} as {v}" for k, v in ALGORITHM_ALIASES.items()) + ")"),
    "target": (TARGET_NAMES, " or ".join(TARGET_NAMES)),
}
"""The value keys shared by the cfg's settings and entries, the CLI and the RKNN facade: valid values, how to list them."""


def canonical(key: str, value: Any) -> str | None:
    """The canonical form of ``value`` for ``key`` (dtype, weight_dtype, qtype, qmethod, algorithm), or None when invalid.

    Aliases are resolved: dtype names (``u8``, ...), ``asymmetric``/``symmetric``, RKNN's algorithm names.
    """
    if key in ("dtype", "weight_dtype"):
        v = normalize_dtype(value)
    elif key == "qtype":
        v = _QTYPE_ALIASES.get(str(value), str(value))
    elif key == "algorithm":
        v = ALGORITHM_ALIASES.get(str(value), str(value))
    else:
        v = value
    return v if v in _CHOICES[key][0] else None


def check_value(key: str, value: Any, where: str, name: str = "", hint: str = "") -> str:
    """:func:`canonical`, or a ConfigError naming ``where`` (and the tensor ``name``) that lists the valid values.

    ``hint`` is appended to the message (e.g. another way to get what was asked).
    """
    v = canonical(key, value)
    if v is None:
        choices, listing = _CHOICES[key]
        of = f" of '{name}'" if name else ""
        raise ConfigError(f"{where}: {key} {value!r}{of} is not valid.{did_you_mean(str(value), choices)} Use {listing}{hint}.")
    return v


@dataclass
class Settings:
    """How step1 calibrates and step2 quantizes, unless a tensor or layer entry says otherwise."""

    dtype: str = "uint8"  # activations: uint8 | int8 | int16 (uint8 asymmetric = RKNN asymmetric_quantized-u8)
    qtype: str = "asym"  # activations: asym | sym
    weight_dtype: str = "int8"  # weights: int8 | int16, always symmetric
    qmethod: str = "channel"  # weights: channel | layer
    algorithm: str = "minmax"  # minmax | percentile | kl | mse
    percentile: float = 99.99  # used by algorithm percentile
    quantize_ops: list[str] = field(default_factory=lambda: list(DEFAULT_QUANTIZE_OPS))  # op types quantized by default
    float_stem: bool = True  # keep a Conv with <= 4 input channels in float (int8 is slower there on x86)
    float_depthwise: bool | str = "auto"  # depthwise Convs in float: true | false | auto (where int8 is not faster; >= 15 % of MACs with cost_model: macs)
    float_pooled: bool = True  # keep Convs on 1x1 pooled tensors (SE blocks) in float (too small for int8 to pay)
    int4_block_size: int = 32  # int4 layers: input features per weight scale (power of 2, >= 16)
    int4_rounding: str = "rtn"  # int4 layers: rtn (round to nearest) | gptq (uses X^T X recorded by step1)
    int4_activations: str = "float"  # int4 layers: float | int8 (ORT quantizes the input per block: accuracy_level 4)
    target: str = "cpu"  # where the model runs: cpu (ONNX Runtime's CPU kernels) | npu (every operator in int8; SPEC 11)
    cost_model: str = "macs"  # macs (MAC-count rules) | measured (step1 times each layer on this CPU; float where int8 is not faster: PP-OCR rec 0.969 -> 0.936)
    speed_check: bool = True  # target cpu: step1 times the default int8 model against fp32 and keeps it float where int8 is not faster
    bias_correction: bool = False  # true: step1 writes each quantized layer's cumulative mean output shift as bias_correction on its weight entry

    def to_dict(self) -> dict:
        """Plain dict for YAML and JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str) -> "Settings":
        """Validate a `settings:` mapping; unknown keys and bad values raise ConfigError naming `where`."""
        known = {f.name for f in fields(cls)}
        for key in data:
            if key not in known:
                raise ConfigError(f"{where}: unknown setting {key!r}.{did_you_mean(str(key), known)} Valid settings: {', '.join(sorted(known))}.")
        s = cls(**{k: v for k, v in data.items()})
        s.validate(where)
        return s

    def validate(self, where: str) -> None:
        """Normalise names and check every value; raises ConfigError naming `where`."""
        for key in ("dtype", "weight_dtype", "qtype", "qmethod", "algorithm", "target"):
            setattr(self, key, check_value(key, getattr(self, key), where))
        try:
            self.percentile = float(self.percentile)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: percentile {self.percentile!r} is not a number; use e.g. 99.99.") from None
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"{where}: percentile {self.percentile} is outside (50, 100]; use e.g. 99.99.")
        if not isinstance(self.quantize_ops, list) or not all(isinstance(o, str) for o in self.quantize_ops):
            raise ConfigError(f"{where}: quantize_ops must be a list of op types, e.g. [Conv, Gemm, MatMul].")
        _check_quantize_ops(self.quantize_ops, where)
        if self.float_depthwise != "auto" and not isinstance(self.float_depthwise, bool):
            raise ConfigError(f"{where}: float_depthwise must be true, false or auto, not {self.float_depthwise!r}.")
        validate_int4(self, where)
        if self.cost_model not in COST_MODELS:
            raise ConfigError(f"{where}: cost_model {self.cost_model!r} is not valid.{did_you_mean(str(self.cost_model), COST_MODELS)} Use measured or macs.")
        for key in ("float_stem", "float_pooled", "speed_check", "bias_correction"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{where}: {key} must be true or false, not {getattr(self, key)!r}.")


QUANTIZE_OP_TYPES = (
    "Add", "AveragePool", "Clip", "Concat", "Conv", "ConvTranspose", "Div", "Erf", "Flatten", "GRU", "Gelu", "Gemm",
    "GlobalAveragePool", "GlobalMaxPool", "HardSigmoid", "HardSwish", "LSTM", "LayerNormalization", "LeakyRelu", "MatMul",
    "MaxPool", "Mul", "Pow", "RNN", "ReduceMean", "Relu", "Reshape", "Resize", "Sigmoid", "Slice", "Softmax", "Split",
    "Sqrt", "Squeeze", "Sub", "Tanh", "Transpose", "Unsqueeze",
)
"""The op types some target quantizes (targets.NPU_QUANTIZABLE and recurrent.RECURRENT; a test keeps them equal)."""


def _check_quantize_ops(ops: list[str], where: str) -> None:
    """Every quantize_ops entry must be an op type some target quantizes: a typo ('Gem') would leave those layers float in silence."""
    for op in ops:
        if op not in QUANTIZE_OP_TYPES:
            raise ConfigError(f"{where}: quantize_ops lists {op!r}, which is not an op type hybridq quantizes.{did_you_mean(op, QUANTIZE_OP_TYPES)} "
                              f"Op types are case-sensitive ONNX names; the quantizable ones are: {', '.join(QUANTIZE_OP_TYPES)}.")


INT4_ROUNDINGS = ("rtn", "gptq")
INT4_ACTIVATIONS = ("float", "int8")


def validate_int4(s: Settings, where: str) -> None:
    """Check the int4 settings; raises ConfigError naming `where`.

    The default block of 32 keeps the 4-bit error small (one scale per 32 weights: 5 bits a weight with fp32 scales,
    still 6.4x smaller than fp32) and divides the small K of OCR and vision-transformer layers; 128 stores 4.25 bits a weight.
    """
    b = s.int4_block_size
    if isinstance(b, bool) or not isinstance(b, int) or b < 16 or b & (b - 1):
        raise ConfigError(f"{where}: int4_block_size {b!r} is not valid; MatMulNBits needs a power of 2 >= 16, e.g. 32 or 128.")
    if s.int4_rounding not in INT4_ROUNDINGS:
        raise ConfigError(f"{where}: int4_rounding {s.int4_rounding!r} is not valid.{did_you_mean(str(s.int4_rounding), INT4_ROUNDINGS)} Use rtn or gptq.")
    if s.int4_activations not in INT4_ACTIVATIONS:
        raise ConfigError(f"{where}: int4_activations {s.int4_activations!r} is not valid.{did_you_mean(str(s.int4_activations), INT4_ACTIVATIONS)} Use float or int8.")
