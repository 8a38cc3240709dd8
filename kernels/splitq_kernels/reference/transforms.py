"""Online activation transforms and their inverses folded into weights.

Everything here uses the torch convention of nn.Linear: y = x @ W.T with W of shape
(out_features, in_features). The paper writes Y = X W with W of shape (D_in, D_out), so the
paper's P^-1 W (applied to the input dim) is W @ P^-T here.

Main channel set (FlatQuant's affine form), for a token x_m of n = n1 * n2 channels:
    x' = kron((x_m * smooth), P1, P2),  kron(v, P1, P2) = flatten(P1^T @ reshape(v, n1, n2) @ P2)
which is v @ (P1 (x) P2) for the row-major flattening; the whole transform is
P_m = diag(smooth) (P1 (x) P2). Outlier sets use one small dense matrix: x' = x_t @ P_t.

Product precision (`precision`, PRODUCT_PRECISIONS): "float32", the definition; or "bf16", what the
kernels compute under SPLITQ_PRECISION=bf16 (splitq_kernels.precision): every operand of a float
product rounded to bfloat16 (`operand`), float32 accumulation, the Kronecker product in the
kernels' order (R P2 first, then P1^T times that).
"""

from __future__ import annotations

import torch

PRODUCT_PRECISIONS = ("float32", "bf16")


def check_precision(precision: str) -> None:
    if precision not in PRODUCT_PRECISIONS:
        raise ValueError(f"product precision must be one of {PRODUCT_PRECISIONS}, got {precision!r}")


def operand(x: torch.Tensor, precision: str) -> torch.Tensor:
    """x as a float product of the kernels reads it: unchanged ("float32") or rounded to the
    nearest bfloat16 ("bf16"), kept in x's dtype so that the product accumulates in it."""
    return x if precision == "float32" else x.to(torch.bfloat16).to(x.dtype)


def kron_apply(x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, precision: str = "float32") -> torch.Tensor:
    """x' = P1^T X P2 per row of x (..., n1 * n2), i.e. x @ kron(P1, P2), without forming kron."""
    check_precision(precision)
    n1, n2 = p1.shape[0], p2.shape[0]
    if x.shape[-1] != n1 * n2:
        raise ValueError(f"kron_apply: last dim {x.shape[-1]} != {n1} * {n2}")
    lead = x.shape[:-1]
    xr = x.reshape(*lead, n1, n2)
    if precision == "float32":
        out = torch.matmul(torch.matmul(p1.transpose(0, 1), xr), p2)
    else:  # the kernels' order: Z = R P2, then P1^T Z, each product on rounded operands
        z = torch.matmul(operand(xr, precision), operand(p2, precision))
        out = torch.matmul(operand(p1.transpose(0, 1), precision), operand(z, precision))
    return out.reshape(*lead, n1 * n2)


def main_transform(
    x_m: torch.Tensor, smooth: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, precision: str = "float32"
) -> torch.Tensor:
    """x_m P_m: the per-channel smoothing scale, then the Kronecker transform."""
    return kron_apply(x_m * smooth, p1, p2, precision)


def fold_main_weight(
    w_m: torch.Tensor, smooth: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor
) -> torch.Tensor:
    """P_m^-1 W_m in torch convention: (W_m / smooth) @ kron(P1, P2)^-T, shape (out, n1 * n2).

    kron(P1, P2)^-T = kron(P1^-T, P2^-T), applied per weight row with kron_apply.
    """
    p1_inv_t = torch.linalg.inv(p1).transpose(0, 1)
    p2_inv_t = torch.linalg.inv(p2).transpose(0, 1)
    return kron_apply(w_m / smooth, p1_inv_t, p2_inv_t)


def fold_dense_weight(w: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """P^-1 W for a dense transform of an outlier set, torch convention: W @ P^-T."""
    return torch.linalg.solve(p, w.transpose(0, 1)).transpose(0, 1)
