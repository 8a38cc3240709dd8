"""One linear-input group under calibration: its learnable SplitQ parameters and their init.

`GroupParams` holds, for one fused group (q/k/v, o, gate/up or down of one decoder layer), the
frozen weight W (out, in) and bias, the channel sets chosen by the selection rule, and the
parameters calibration trains (FlatQuant's recipe, the paper's Sec. 4 and 5.1):

- main transform P_m = diag(smooth) (P1 kron P2): smooth initialised SmoothQuant-style,
  smooth_c = max|W_c|^(1-alpha) / max|x_c|^alpha (FlatQuant's diagonal init, alpha 0.3; the
  SmoothQuant baseline uses the same formula with alpha 0.5 and no Kronecker factors), P1, P2
  random orthogonal (FlatQuant) or the identity (RTN, SmoothQuant);
- outlier transforms P_t, P_v: full matrices of the set's size, initialised the same way
  (diag(smooth) times a random orthogonal matrix);
- learnable weight clipping per output channel and activation clipping per path (clip =
  sigmoid(param), param initialised at 4 as in FlatQuant; 1.0 when not learned);
- CWS and MAC: the constrained factors of Eq. 20-21 (lowrank.constrained_factors) from the rank-r
  SVD of W_m with diagonal gates G_s, G_c initialised to 1; "fixed" keeps the gates at 1 (the
  plain SVD branch pushed through P_m^-1, Tables 10-11), "learnable" trains them.

`float_layer()` builds the differentiable SplitQFloatLinear (P^-1 folded into the weights by
the reference's fold_* functions), which the reference's splitq_linear_fake runs and
quantize_linear freezes.

Memory: the frozen weights stay in the dtype they came in (the files': bf16, 2 bytes per weight
instead of 4), and everything computed from them at full size in float32 (the folded,
fake-quantized weights; the quantized layer) is computed in blocks of output rows
(ROW_BLOCK_ELEMENTS weights each): every weight quantizer is per output row and P^-1 acts on the
input dim, so row blocks are exact. `fake_weights()` / `backward_weights()` split one training
step's weight side off the per-sample forwards (method.train_groups).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from splitq_kernels.reference import (
    ChannelSplit,
    FakeQuantWeights,
    SplitQFloatLinear,
    SplitQLinear,
    concat_outputs,
    fake_quantize_weights,
    fold_dense_weight,
    fold_main_weight,
    quantize_linear,
)

from .dims import kron_factors, rank_for
from .lowrank import constrained_factors, svd_basis
from .mocd import ChannelStats
from .recipe import CalibrationConfig


def random_orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian with the sign of R's diagonal fixed)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(n, dtype=torch.float64))


ROW_BLOCK_ELEMENTS = 2**24  # weights per block of output rows: 64 MB per float32 temporary


def row_blocks(rows: int, cols: int) -> list[tuple[int, int]]:
    """[start, stop) blocks of output rows with at most ROW_BLOCK_ELEMENTS weights each."""
    step = max(1, ROW_BLOCK_ELEMENTS // max(cols, 1))
    return [(r, min(r + step, rows)) for r in range(0, rows, step)] or [(0, 0)]


def column_absmax(w: torch.Tensor) -> torch.Tensor:
    """max_r |W_rc| per column, float32, without a full-size temporary."""
    out = torch.zeros(w.shape[1], dtype=torch.float32, device=w.device)
    for r0, r1 in row_blocks(*w.shape):
        out = torch.maximum(out, w[r0:r1].abs().amax(0).to(torch.float32))
    return out


def smooth_scale(w: torch.Tensor, x_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """max|W_c|^(1-alpha) / max|x_c|^alpha per input channel c (w: (out, in)), clamped to [1e-5, 1e5]."""
    w_max = column_absmax(w).to(torch.float64).clamp(min=1e-5)
    x_max = x_absmax.to(torch.float64).clamp(min=1e-5)
    return (w_max.pow(1 - alpha) / x_max.pow(alpha)).clamp(1e-5, 1e5)


class GroupParams(nn.Module):
    """The learnable SplitQ parameters of one fused linear-input group (see the module doc)."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        idx_text: torch.Tensor,
        idx_vision: torch.Tensor,
        stats: ChannelStats,
        config: CalibrationConfig,
        gen: torch.Generator,
    ) -> None:
        super().__init__()
        cfg = config
        out_f, in_f = weight.shape
        dev = weight.device
        w = weight.detach()  # frozen, in its own dtype (see the module doc)
        self.scheme = cfg.quant_scheme
        idx_text, idx_vision = idx_text.to(dev, torch.long), idx_vision.to(dev, torch.long)
        taken = torch.zeros(in_f, dtype=torch.bool, device=dev)
        taken[idx_text] = True
        taken[idx_vision] = True
        idx_main = torch.nonzero(~taken).reshape(-1)
        absmax = stats.absmax.to(dev)
        self.register_buffer("idx_main", idx_main)
        self.register_buffer("idx_text", idx_text)
        self.register_buffer("idx_vision", idx_vision)
        self.register_buffer("w_main", w.index_select(1, idx_main))
        self.register_buffer("w_text", w.index_select(1, idx_text))
        self.register_buffer("w_vision", w.index_select(1, idx_vision))
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32))
        train = bool(cfg.train)

        def smooth_for(name: str, idx: torch.Tensor) -> torch.Tensor:
            if cfg.smooth_init == "none" or idx.numel() == 0:
                return torch.ones(idx.numel(), dtype=torch.float64, device=dev)
            alpha = cfg.smoothquant_alpha if cfg.smooth_init == "smoothquant" else cfg.smooth_alpha
            return smooth_scale(getattr(self, f"w_{name}"), absmax[idx], alpha)

        def rotation(n: int) -> torch.Tensor:
            if cfg.transform_init == "identity":
                return torch.eye(n, dtype=torch.float64, device=dev)
            return random_orthogonal(n, gen).to(dev)  # drawn on the CPU: the same on every device

        n1, n2 = kron_factors(idx_main.numel())
        f32 = lambda t: t.to(torch.float32).contiguous()  # noqa: E731
        self.smooth = nn.Parameter(f32(smooth_for("main", idx_main)), requires_grad=train)
        self.p1 = nn.Parameter(f32(rotation(n1)), requires_grad=train)
        self.p2 = nn.Parameter(f32(rotation(n2)), requires_grad=train)
        self.p_text = self.p_vision = None
        if idx_text.numel():
            self.p_text = nn.Parameter(
                f32(smooth_for("text", idx_text)[:, None] * rotation(idx_text.numel())), requires_grad=train
            )
        if idx_vision.numel():
            self.p_vision = nn.Parameter(
                f32(smooth_for("vision", idx_vision)[:, None] * rotation(idx_vision.numel())), requires_grad=train
            )

        # clipping: sigmoid(param); only when trained (RTN / SmoothQuant use the full range)
        def clip_param(shape, on: bool) -> nn.Parameter | None:
            if not (train and on):
                return None
            return nn.Parameter(torch.full(shape, float(cfg.clip_init), device=dev), requires_grad=True)

        self.wclip_main = clip_param((out_f, 1), cfg.weight_clip)
        self.wclip_text = clip_param((out_f, 1), cfg.weight_clip and idx_text.numel() > 0)
        self.wclip_vision = clip_param((out_f, 1), cfg.weight_clip and idx_vision.numel() > 0)
        self.aclip_main = clip_param((), cfg.act_clip)
        self.aclip_text = clip_param((), cfg.act_clip and idx_text.numel() > 0)
        self.aclip_vision = clip_param((), cfg.act_clip and idx_vision.numel() > 0)

        # CWS / MAC: Eq. 20-21 on the SVD of the untransformed W_m
        self.cws_rank = rank_for(in_f, out_f, cfg.cws_ratio)
        self.mac_rank = rank_for(in_f, out_f, cfg.mac_ratio)
        self.cws_rank = min(self.cws_rank, idx_main.numel(), out_f)
        self.mac_rank = min(self.mac_rank, idx_main.numel(), out_f)
        rmax = max(self.cws_rank, self.mac_rank)
        if rmax:
            u, s, v = svd_basis(self.w_main, rmax, gen)
            self.register_buffer("svd_u", f32(u))
            self.register_buffer("svd_s", f32(s))
            self.register_buffer("svd_v", f32(v))
        self.gate_cws = self.gate_mac = None
        if self.cws_rank:
            self.gate_cws = nn.Parameter(
                torch.ones(self.cws_rank, device=dev), requires_grad=train and cfg.cws_lowrank == "learnable"
            )
        if self.mac_rank:
            self.gate_mac = nn.Parameter(
                torch.ones(self.mac_rank, device=dev), requires_grad=train and cfg.mac_lowrank == "learnable"
            )
        self.aclip_mac = clip_param((), cfg.act_clip and self.mac_rank > 0)

    # ------------------------------------------------------------------------------------------
    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(transforms and gates, clipping factors): the two learning rates of FlatQuant."""
        main, clip = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (clip if "clip" in name else main).append(p)
        return main, clip

    def _aclip(self, p: nn.Parameter | None) -> torch.Tensor:
        return torch.ones((), device=self.w_main.device) if p is None else torch.sigmoid(p)

    def _branch(self, rank: int, gate: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        return constrained_factors(
            self.svd_u[:, :rank], self.svd_s[:rank], self.svd_v[rows, :rank], gate, self.smooth, self.p1, self.p2
        )

    def input_side(self) -> ChannelSplit:
        """Channel sets, transforms and activation clipping (what the forward applies to x)."""
        return ChannelSplit(
            idx_main=self.idx_main,
            idx_text=self.idx_text,
            idx_vision=self.idx_vision,
            main_smooth=self.smooth,
            main_p1=self.p1,
            main_p2=self.p2,
            text_p=self.p_text,
            vision_p=self.p_vision,
            main_act_clip=self._aclip(self.aclip_main),
            text_act_clip=self._aclip(self.aclip_text),
            vision_act_clip=self._aclip(self.aclip_vision),
            mac_act_clip=self._aclip(self.aclip_mac),
        )

    def float_layer(self, rows: tuple[int, int] | None = None) -> SplitQFloatLinear:
        """The differentiable float SplitQ layer of the current parameters; with `rows`, only
        output rows [start, stop) of it (the input side whole)."""
        sl = slice(None) if rows is None else slice(*rows)
        f32 = torch.float32
        cws = self._branch(self.cws_rank, self.gate_cws, sl) if self.cws_rank else (None, None)
        mac = self._branch(self.mac_rank, self.gate_mac, sl) if self.mac_rank else (None, None)

        def clip(p: nn.Parameter | None) -> torch.Tensor | None:
            return None if p is None else torch.sigmoid(p[sl])

        side = self.input_side()
        return SplitQFloatLinear(
            **{f: getattr(side, f) for f in _CHANNEL_SPLIT_FIELDS},
            main_weight=fold_main_weight(self.w_main[sl].to(f32), self.smooth, self.p1, self.p2),
            text_weight=None if self.p_text is None else fold_dense_weight(self.w_text[sl].to(f32), self.p_text),
            vision_weight=None
            if self.p_vision is None
            else fold_dense_weight(self.w_vision[sl].to(f32), self.p_vision),
            cws_down=cws[0],
            cws_up=cws[1],
            mac_down=mac[0],
            mac_up=mac[1],
            bias=None if self.bias is None else self.bias[sl],
            main_weight_clip=clip(self.wclip_main),
            text_weight_clip=clip(self.wclip_text),
            vision_weight_clip=clip(self.wclip_vision),
        )

    def row_blocks(self) -> list[tuple[int, int]]:
        return row_blocks(self.w_main.shape[0], self.w_main.shape[1] + self.w_text.shape[1] + self.w_vision.shape[1])

    def fake_weights(self) -> FakeQuantWeights:
        """The weight side of one training step (reference.fake_quantize_weights), computed block
        by block without a graph into preallocated tensors: the per-sample forwards use it as
        leaves, and `backward_weights` carries their gradients into the parameters."""
        rows = self.w_main.shape[0]
        out: dict[str, torch.Tensor | None] = {}
        with torch.no_grad():
            for r0, r1 in self.row_blocks():
                part = fake_quantize_weights(self.float_layer((r0, r1)), self.scheme)
                if not out:
                    for f in _SHARED:
                        out[f] = getattr(part, f)
                    for f in _OUTPUT_ROWS:
                        t = getattr(part, f)
                        out[f] = None if t is None else t.new_empty((rows, *t.shape[1:]))
                for f in _OUTPUT_ROWS:
                    if out[f] is not None:
                        out[f][r0:r1] = getattr(part, f)
                del part
        return FakeQuantWeights(**out)

    def backward_weights(self, grads: FakeQuantWeights) -> None:
        """Backpropagate d(loss)/d(weight side) into the parameters: each row block's weight side
        is recomputed with its graph, which is freed before the next block."""
        for bi, (r0, r1) in enumerate(self.row_blocks()):
            part = fake_quantize_weights(self.float_layer((r0, r1)), self.scheme)
            outs, ins = [], []
            for name in _OUTPUT_ROWS:
                t, g = getattr(part, name), getattr(grads, name)
                if t is not None and g is not None and t.requires_grad:
                    outs.append(t)
                    ins.append(g[r0:r1])
            if bi == 0:  # the *_down factors are the same in every block: their gradient once
                for name in _SHARED:
                    t, g = getattr(part, name), getattr(grads, name)
                    if t is not None and g is not None and t.requires_grad:
                        outs.append(t)
                        ins.append(g)
            if outs:
                torch.autograd.backward(outs, ins)

    def quantized(self) -> SplitQLinear:
        """The quantized layer of the current parameters (quantize_linear, block by block)."""
        with torch.no_grad():
            blocks = [quantize_linear(self.float_layer(b), self.scheme) for b in self.row_blocks()]
        return blocks[0] if len(blocks) == 1 else concat_outputs(blocks)


_CHANNEL_SPLIT_FIELDS = [f.name for f in dataclasses.fields(ChannelSplit)]
_OUTPUT_ROWS = ("main", "text", "vision", "cws_up", "mac_up", "bias")
_SHARED = ("cws_down", "mac_down")
