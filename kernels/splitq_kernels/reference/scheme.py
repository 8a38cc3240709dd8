"""Bit settings of a SplitQ model (the paper's WxAy, plus the auxiliary-branch bits)."""

from __future__ import annotations

import re
from dataclasses import dataclass

MAC_ROWS = ("text", "vision", "all")
AUX_MIN_BITS = 4  # the paper's 4-bit lower bound for outlier paths, CWS and MAC (Sec. 5.1)


@dataclass(frozen=True)
class SplitQScheme:
    """Which bits each path uses; weights are symmetric per output channel.

    weight_bits / act_bits: the main path (W_m, X_m).
    aux_weight_bits / aux_act_bits: the outlier paths (weights and activations), the CWS and MAC
    low-rank factors, and the MAC residual activation. The CWS down product reads the main
    activation codes, so it runs at act_bits.
    mac_rows: which rows receive the MAC compensation (the paper's choice is "text"; "vision" and
    "all" exist for the ablation of Table 5).
    """

    weight_bits: int
    act_bits: int
    aux_weight_bits: int
    aux_act_bits: int
    act_symmetric: bool = True
    mac_rows: str = "text"

    def __post_init__(self) -> None:
        for name in ("weight_bits", "act_bits", "aux_weight_bits", "aux_act_bits"):
            v = getattr(self, name)
            if not isinstance(v, int) or not 2 <= v <= 8:
                raise ValueError(f"SplitQScheme.{name} must be an int in 2..8, got {v!r}")
        if self.mac_rows not in MAC_ROWS:
            raise ValueError(f"SplitQScheme.mac_rows must be one of {MAC_ROWS}, got {self.mac_rows!r}")

    @classmethod
    def from_name(
        cls, name: str, act_symmetric: bool = True, mac_rows: str = "text"
    ) -> "SplitQScheme":
        """'w4a4' -> W4A4 with auxiliary branches at max(4, bits)."""
        m = re.fullmatch(r"w([2-8])a([2-8])", name.strip().lower())
        if not m:
            raise ValueError(f"unknown scheme {name!r}: expected wXaY with X, Y in 2..8, e.g. 'w4a4'")
        wb, ab = int(m.group(1)), int(m.group(2))
        return cls(
            weight_bits=wb,
            act_bits=ab,
            aux_weight_bits=max(AUX_MIN_BITS, wb),
            aux_act_bits=max(AUX_MIN_BITS, ab),
            act_symmetric=act_symmetric,
            mac_rows=mac_rows,
        )

    @property
    def name(self) -> str:
        return f"w{self.weight_bits}a{self.act_bits}"
