"""The constrained low-rank branches of CWS and MAC (the paper's Eq. 20-21).

W_m ~ U_r S_r V_r^T (rank-r truncated SVD, paper layout W_m: D_m x D_out); each branch is
U_* = P_m^-1 U_r and V_* = S_r G_* V_r^T with a learnable diagonal gate G_*. In this project's
torch layout the branch is a `down` (r x D_m) = U_*^T and an `up` (D_out x r) = V_*^T linear, so
down = fold_main_weight(U_r^T) and up = V_r diag(S_r g).
"""

from __future__ import annotations

import torch

from splitq_kernels.reference import fold_main_weight


def svd_basis(w_main: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-r SVD of W_m given in torch layout (D_out, D_m): returns U_r (D_m, r), S_r (r,), V_r (D_out, r)."""
    u, s, vh = torch.linalg.svd(w_main.transpose(0, 1).to(torch.float64), full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank].transpose(0, 1)


def constrained_factors(
    u_r: torch.Tensor,
    s_r: torch.Tensor,
    v_r: torch.Tensor,
    gate: torch.Tensor,
    smooth: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) of one branch from the SVD basis, the main transform and the gate (Eq. 21).

    Differentiable in gate, smooth, p1 and p2, so calibration can train them through it.
    """
    dt = p1.dtype
    down = fold_main_weight(u_r.transpose(0, 1).to(dt), smooth, p1, p2)
    up = v_r.to(dt) * (s_r.to(dt) * gate)
    return down, up
