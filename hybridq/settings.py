"""Global quantization settings: typed, with defaults, one-to-one with the cfg's `settings:` block."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .errors import ConfigError, did_you_mean
from .observers import ALGORITHM_ALIASES, ALGORITHMS
from .qparams import normalize_dtype

DEFAULT_QUANTIZE_OPS = ("Conv", "Gemm", "MatMul")


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
    float_depthwise: bool | str = "auto"  # depthwise Convs in float: true | false | auto (when they are >= 15 % of the compute)
    float_pooled: bool = True  # keep Convs on 1x1 pooled tensors (SE blocks) in float (too small for int8 to pay)

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
        dt = normalize_dtype(self.dtype)
        if dt not in ("uint8", "int8", "int16", "uint16"):
            raise ConfigError(f"{where}: dtype {self.dtype!r} is not an activation dtype; use uint8, int8 or int16.")
        self.dtype = dt
        wdt = normalize_dtype(self.weight_dtype)
        if wdt not in ("int8", "int16"):
            raise ConfigError(f"{where}: weight_dtype {self.weight_dtype!r} is not valid; use int8 or int16.")
        self.weight_dtype = wdt
        self.qtype = {"asymmetric": "asym", "symmetric": "sym"}.get(str(self.qtype), str(self.qtype))
        if self.qtype not in ("asym", "sym"):
            raise ConfigError(f"{where}: qtype {self.qtype!r} is not valid; use asym or sym.")
        if self.qmethod not in ("channel", "layer"):
            raise ConfigError(f"{where}: qmethod {self.qmethod!r} is not valid; use channel or layer.")
        algo = ALGORITHM_ALIASES.get(str(self.algorithm), str(self.algorithm))
        if algo not in ALGORITHMS:
            raise ConfigError(f"{where}: algorithm {self.algorithm!r} is not valid.{did_you_mean(algo, ALGORITHMS)} Use one of: {', '.join(ALGORITHMS)}.")
        self.algorithm = algo
        try:
            self.percentile = float(self.percentile)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: percentile {self.percentile!r} is not a number; use e.g. 99.99.") from None
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"{where}: percentile {self.percentile} is outside (50, 100]; use e.g. 99.99.")
        if not isinstance(self.quantize_ops, list) or not all(isinstance(o, str) for o in self.quantize_ops):
            raise ConfigError(f"{where}: quantize_ops must be a list of op types, e.g. [Conv, Gemm, MatMul].")
        if self.float_depthwise != "auto" and not isinstance(self.float_depthwise, bool):
            raise ConfigError(f"{where}: float_depthwise must be true, false or auto, not {self.float_depthwise!r}.")
        for key in ("float_stem", "float_pooled"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{where}: {key} must be true or false, not {getattr(self, key)!r}.")
