"""The constrained low-rank branches of CWS and MAC (the paper's Eq. 20-21).

W_m ~ U_r S_r V_r^T (rank-r truncated SVD, paper layout W_m: D_m x D_out); each branch is
U_* = P_m^-1 U_r and V_* = S_r G_* V_r^T with a learnable diagonal gate G_*. In this project's
torch layout the branch is a `down` (r x D_m) = U_*^T and an `up` (D_out x r) = V_*^T linear, so
down = fold_main_weight(U_r^T) and up = V_r diag(S_r g).
"""

from __future__ import annotations

import torch

from splitq_kernels.reference import fold_main_weight


# Above this many multiply-adds (m * n * min(m, n)) the exact float64 SVD gives way to the
# randomized one: 2e9 is a 768-wide toy layer; a 7B gate_up (37888 x 3456) is 4.5e11.
EXACT_SVD_COST = 2e9
OVERSAMPLE = 16
POWER_ITERATIONS = 4


def svd_basis(
    w_main: torch.Tensor, rank: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-r SVD of W_m given in torch layout (D_out, D_m): returns U_r (D_m, r), S_r (r,), V_r (D_out, r).

    Exact (float64) for small matrices; above EXACT_SVD_COST the randomized range finder
    (randomized_svd): only the top r directions are used, and the full SVD of a 7B gate_up costs
    minutes and a float64 copy of the weight.
    """
    m, n = w_main.shape
    if m * n * min(m, n) <= EXACT_SVD_COST:
        u, s, vh = torch.linalg.svd(w_main.transpose(0, 1).to(torch.float64), full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank].transpose(0, 1)
    left, s, right = randomized_svd(w_main, rank, generator)
    return right, s, left


def randomized_svd(
    a: torch.Tensor,
    rank: int,
    generator: torch.Generator | None = None,
    oversample: int = OVERSAMPLE,
    power_iterations: int = POWER_ITERATIONS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` singular triplets of a (m, n): (U (m, r), S (r,), V (n, r)) with A ~ U diag(S) V^T.

    Halko, Martinsson and Tropp's range finder with power iterations (re-orthonormalised each
    time, so float32 products do not lose the small directions), seeded by `generator` so a run is
    reproducible; the big products run in float32 on a's device, the small SVD in float64.
    """
    a32 = a.to(torch.float32)
    m, n = a32.shape
    k = min(rank + oversample, m, n)
    omega = torch.randn(n, k, generator=generator, dtype=torch.float32).to(a32.device)
    q = torch.linalg.qr(a32 @ omega).Q
    for _ in range(power_iterations):
        z = torch.linalg.qr(a32.transpose(0, 1) @ q).Q
        q = torch.linalg.qr(a32 @ z).Q
    b = (q.transpose(0, 1) @ a32).to(torch.float64)  # (k, n)
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)
    u = q.to(torch.float64) @ ub[:, :rank]
    return u, s[:rank], vh[:rank].transpose(0, 1)


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
