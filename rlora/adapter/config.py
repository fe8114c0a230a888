"""`AdapterConfig`: what an adapter is, validated once, serialised into ``adapter_config.json``."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

METHODS = ("lora", "hydralora", "rlora")
DEFAULT_TARGET_MODULES = ("gate_proj", "up_proj", "down_proj")  # paper, Appendix C
ALL_LINEAR = "all-linear"
INIT_SCALES = ("paper", "reference")
# "kaiming": every router starts Kaiming-uniform, as HydraLoRA's and R-LoRA's reference code
# do; "zero": the router of random heads starts at zero (format version 1's only choice), kept
# to compare against. Zero heads always start a Kaiming router: a zero one would give every
# head the same gradient forever.
ROUTER_INITS = ("kaiming", "zero")
# Safety bounds, not policy: past them an adapter is no longer a small update to the base
# model but swamps it, and bfloat16 outputs overflow to inf/NaN (an alpha of 1e38 trained
# "successfully" into NaN outputs). alpha: common values are 8..512 (alpha = 2 * rank at rank
# 256); 1e4 is twenty times that. gamma divides the random heads' scale (paper: 64): under
# 1e-2 a head starts ten times larger than at gamma 1, over 1e6 it starts a thousandth of
# gamma 1's, no longer "random". init_scale: the paper's factor is 0.5..2 for d_out up to
# 65536; 100 is fifty times the largest.
MAX_ALPHA = 1e4
GAMMA_RANGE = (1e-2, 1e6)
MAX_INIT_SCALE = 100.0
# The paper's methods and its two R-LoRA ablations (Table 5) as AdapterConfig settings.
VARIANTS = {
    "lora": dict(method="lora"),
    "hydralora": dict(method="hydralora"),
    "rlora": dict(method="rlora"),
    "rlora-no-md": dict(method="rlora", multi_head_dropout=False),
    "rlora-no-mi": dict(method="rlora", random_init=False),
}


class AdapterConfigError(ValueError):
    """A bad adapter setting; ``field`` names the setting."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


@dataclass(frozen=True)
class AdapterConfig:
    """Settings of one R-LoRA-family adapter.

    ``method`` picks the paper's variants; the two ablations of R-LoRA are switches:
    ``multi_head_dropout=False`` (R-LoRA without MD: dropout on the input, shared by heads) and
    ``random_init=False`` (R-LoRA without MI: zero heads). ``None`` means "as the method says".
    """

    method: str = "rlora"
    heads: int | None = None  # None: 1 for lora, 3 otherwise
    rank: int = 4
    alpha: float = 32.0
    dropout: float = 0.2
    target_modules: tuple[str, ...] | str = DEFAULT_TARGET_MODULES
    seed: int = 0
    rank_stabilized: bool = False
    gamma: float = 64.0
    # "paper": d_out^(1/4) / sqrt(gamma); "reference": r^(1/4) / sqrt(gamma), the factor the
    # public reference code uses (not its per-head compounding of that factor, a bug that
    # scales head j of N by c^(N-j)); a number: that factor itself.
    init_scale: str | float = "paper"
    multi_head_dropout: bool | None = None
    random_init: bool | None = None
    router_init: str = "kaiming"

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        self._validate()

    def _validate(self) -> None:
        if self.heads is None:
            object.__setattr__(self, "heads", 1 if self.method == "lora" else 3)
        if self.method not in METHODS:
            raise AdapterConfigError("method", f"must be one of {', '.join(METHODS)}, got {self.method!r}")
        _check_int("heads", self.heads, 1, 64)
        _check_int("rank", self.rank, 1, 256)
        _check_int("seed", self.seed, 0, 2**63 - 1)
        if self.method == "lora" and self.heads != 1:
            raise AdapterConfigError("heads", f"lora has exactly one head and no router, got heads={self.heads}")
        if not _is_number(self.alpha) or not 0 < self.alpha <= MAX_ALPHA:
            raise AdapterConfigError("alpha", f"must be a number > 0 and <= {MAX_ALPHA:g}, got {self.alpha!r}")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise AdapterConfigError("dropout", f"must be in [0, 1), got {self.dropout!r}")
        low, high = GAMMA_RANGE
        if not _is_number(self.gamma) or not low <= self.gamma <= high:
            raise AdapterConfigError("gamma", f"must be a number in [{low:g}, {high:g}], got {self.gamma!r}")
        scales = f"must be one of {', '.join(INIT_SCALES)} or a number > 0 and <= {MAX_INIT_SCALE:g}, got {self.init_scale!r}"
        if isinstance(self.init_scale, str):
            if self.init_scale not in INIT_SCALES:
                raise AdapterConfigError("init_scale", scales)
        elif not _is_number(self.init_scale) or not 0 < self.init_scale <= MAX_INIT_SCALE:
            raise AdapterConfigError("init_scale", scales)
        if not isinstance(self.rank_stabilized, bool):
            raise AdapterConfigError("rank_stabilized", "must be true or false")
        targets = self.target_modules
        if isinstance(targets, str):
            if targets != ALL_LINEAR:
                raise AdapterConfigError("target_modules", f"must be a list of module names or {ALL_LINEAR!r}, got {targets!r}")
        elif not isinstance(targets, tuple) or not targets or not all(isinstance(t, str) and t for t in targets):
            raise AdapterConfigError("target_modules", "must be a non-empty list of module names")
        if self.router_init not in ROUTER_INITS:
            raise AdapterConfigError("router_init", f"must be one of {', '.join(ROUTER_INITS)}, got {self.router_init!r}")
        for switch in ("multi_head_dropout", "random_init"):
            value = getattr(self, switch)
            if value is not None and not isinstance(value, bool):
                raise AdapterConfigError(switch, "must be true, false or null")
            if value is not None and self.method != "rlora":
                raise AdapterConfigError(switch, f"is an R-LoRA ablation switch; method {self.method!r} fixes it")
        if self.router_init == "zero" and not self.uses_random_init:
            raise AdapterConfigError(
                "router_init", "zero is for heads that start random; with zero heads a zero router would keep every head identical forever"
            )

    # What the method and switches amount to; the layer reads only these.
    @property
    def has_router(self) -> bool:
        return self.method != "lora"

    @property
    def uses_multi_head_dropout(self) -> bool:
        return self.method == "rlora" and self.multi_head_dropout is not False

    @property
    def uses_random_init(self) -> bool:
        return self.method == "rlora" and self.random_init is not False

    @property
    def routes_correction(self) -> bool:
        """Whether the frozen init correction weighs the initial heads by a frozen copy of the
        initial router (Kaiming router), rather than by exactly 1/N (zero router)."""
        return self.uses_random_init and self.router_init == "kaiming"

    @property
    def scaling(self) -> float:
        return self.alpha / (self.rank**0.5 if self.rank_stabilized else self.rank)

    def head_init_scale(self, d_out: int) -> float:
        """The factor of Table 1 in front of both random initialisations."""
        if self.init_scale == "paper":
            return d_out**0.25 / self.gamma**0.5
        if self.init_scale == "reference":
            return self.rank**0.25 / self.gamma**0.5
        return float(self.init_scale)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if isinstance(self.target_modules, tuple):
            data["target_modules"] = list(self.target_modules)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AdapterConfigError(unknown[0], f"unknown adapter setting (known: {', '.join(sorted(known))})")
        return cls(**data)


def _is_number(value: Any) -> bool:
    """A finite int or float (not a bool): NaN and infinities are no setting."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int beyond any float
        return False


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise AdapterConfigError(name, f"must be an integer in {low}..{high}, got {value!r}")


