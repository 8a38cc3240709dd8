"""Which layers and devices the Triton kernels implement, answered before anything is prepared.

`can_implement` is what a caller (the vLLM plugin) asks to choose between the kernels and the
reference, like vLLM's kernel classes: (True, "") or (False, the reason), never an exception.
"""

from __future__ import annotations

import importlib.util

import torch

from .layout import MAX_N1
from .reference.scheme import SplitQScheme

MIN_CAPABILITY = (8, 0)  # int8 tensor-core MMA (tl.dot on int8) from Ampere on


def can_implement(
    kron: tuple[int, int], scheme: SplitQScheme, device: torch.device | str, interpreter: bool = False
) -> tuple[bool, str]:
    """Whether the kernels run a layer whose main set factorises as `kron` = (n1, n2) under
    `scheme` on `device`. interpreter=True accepts a CPU device (Triton's interpreter: slow, for
    tests); otherwise only CUDA devices of compute capability >= 8.0 qualify."""
    device = torch.device(device)
    if importlib.util.find_spec("triton") is None:
        return False, "Triton is not installed"
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < MIN_CAPABILITY:
            return False, f"{torch.cuda.get_device_name(device)} is sm_{cap[0]}{cap[1]}; the kernels need sm_80 or newer"
    elif not (interpreter and device.type == "cpu"):
        return False, f"no CUDA device ({device}); on the CPU the kernels run only in Triton's interpreter"
    n1 = kron[0]
    if n1 > MAX_N1:
        return False, f"Kronecker factor n1={n1} > {MAX_N1} (the transform tiles are kept in registers)"
    return True, ""
