"""splitq_kernels.support.can_implement: the kernels' limits, answered with a reason."""

import torch

from splitq_kernels.layout import MAX_N1
from splitq_kernels.reference import SplitQScheme
from splitq_kernels.support import can_implement

W4A4 = SplitQScheme.from_name("w4a4")


def test_cpu_only_through_the_interpreter():
    ok, reason = can_implement((56, 64), W4A4, "cpu")
    assert not ok and "no CUDA device" in reason and "interpreter" in reason
    assert can_implement((56, 64), W4A4, "cpu", interpreter=True) == (True, "")


def test_kronecker_factor_limit_is_named():
    assert can_implement((MAX_N1, 3), W4A4, "cpu", interpreter=True)[0]
    ok, reason = can_implement((MAX_N1 + 1, 3), W4A4, "cpu", interpreter=True)
    assert not ok and f"n1={MAX_N1 + 1}" in reason


def test_cuda_capability_is_checked_when_there_is_a_gpu():
    if not torch.cuda.is_available():
        return  # nothing to ask on this machine; the branch runs on the GPU machine
    ok, reason = can_implement((56, 64), W4A4, "cuda")
    assert ok == (torch.cuda.get_device_capability() >= (8, 0)), reason
