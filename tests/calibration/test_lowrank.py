"""The truncated SVD behind CWS and MAC (calibration/splitq_calibration/lowrank.py): the randomized
range finder used at real widths gives the exact SVD's top directions on fresh random matrices."""

from __future__ import annotations

import pytest
import torch

from splitq_calibration import lowrank
from splitq_calibration.lowrank import randomized_svd, svd_basis


def _matrix(seed: int, m: int, n: int, decay: float) -> torch.Tensor:
    """A random (m, n) matrix with singular values decay^i (real weights' spectra decay too)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, min(m, n), generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, min(m, n), generator=gen, dtype=torch.float64)).Q
    s = decay ** torch.arange(min(m, n), dtype=torch.float64)
    return ((u * s) @ v.T).to(torch.float32)


@pytest.mark.parametrize("seed,m,n,rank", [(0, 700, 300, 6), (1, 257, 900, 18), (2, 1000, 1000, 30)])
def test_randomized_svd_matches_the_exact_top_directions(seed, m, n, rank):
    a = _matrix(seed, m, n, 0.97)
    u, s, v = randomized_svd(a, rank, torch.Generator().manual_seed(seed))
    ue, se, vhe = torch.linalg.svd(a.to(torch.float64), full_matrices=False)
    # neighbouring singular values 3% apart: directions within 1e-3 (measured: 1e-4 to 9e-4)
    torch.testing.assert_close(s, se[:rank], rtol=5e-4, atol=0)
    for got, exact in ((u, ue[:, :rank]), (v, vhe[:rank].T)):  # up to sign: compare the projectors
        torch.testing.assert_close(got @ got.T, exact @ exact.T, rtol=0, atol=3e-3)
    # and the rank-r approximation is as good as the optimal one (Eckart-Young) to 1e-4
    err = (a.to(torch.float64) - (u * s) @ v.T).norm()
    assert err <= (1 + 1e-4) * se[rank:].norm()


def test_svd_basis_switches_to_the_randomized_svd_above_the_cost(monkeypatch):
    w = _matrix(3, 600, 400, 0.95)  # torch layout (D_out, D_m)
    u_e, s_e, v_e = svd_basis(w, 10)
    assert u_e.dtype == torch.float64  # exact path
    monkeypatch.setattr(lowrank, "EXACT_SVD_COST", 0)
    u, s, v = svd_basis(w, 10, torch.Generator().manual_seed(0))
    assert u.shape == u_e.shape == (400, 10) and v.shape == v_e.shape == (600, 10)
    torch.testing.assert_close(s, s_e, rtol=5e-4, atol=0)
    torch.testing.assert_close((v * s) @ u.T, (v_e * s_e) @ u_e.T, rtol=0, atol=1e-3)
    again = svd_basis(w, 10, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip((u, s, v), again))  # seeded: reproducible
