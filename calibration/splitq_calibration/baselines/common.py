"""What the baseline methods (MBQ, MASQuant, VLMQ) share: the group inputs they search on, the
block-wise token gradients, and the plain SplitQ parameters their results are written into.

- `GroupSamples`: rows of one group's FP input over the calibration set (a seeded subset of at
  most `baseline_max_tokens` rows, both modalities kept in proportion), with their text mask and
  (sample, position) so gradients taken in another pass line up with them.
- `token_gradients`: the block-wise backward of VLMQ (Sec. 4.2) that MBQ's sensitivities (Eq.
  11-14) also come from. Every group of the layer runs its RTN fake-quant forward (the SplitQ
  format with identity transforms, `GroupRunner`), the loss is the squared error of the layer
  output against the FP output, and the gradient of that loss w.r.t. each group's output is
  read per token. The papers take the gradient of the SFT loss (MBQ) or of the error against a
  block with quantized inputs (VLMQ, Eq. 5); this pipeline feeds every layer the FP inputs of
  the FP model, so that error would be zero: the layer's own quantization error stands for it.
- `plain_params`: a GroupParams with no outlier sets, identity transforms and unit smoothing, the
  container the methods set their smoothing (MBQ, MASQuant) or weights (VLMQ) in, so export, the
  reference and the vLLM plugin serve the result unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..group_params import GroupParams
from ..layer import GroupRunner, MaskHolder, run_sample
from ..mocd import ChannelStats
from ..recipe import CalibrationConfig


@dataclass
class GroupSamples:
    """Sampled FP input rows of one group (float32, CPU)."""

    rows: list[torch.Tensor] = field(default_factory=list)  # per sample (k_i, D)
    text: list[torch.Tensor] = field(default_factory=list)  # per sample (k_i,) bool
    positions: list[torch.Tensor] = field(default_factory=list)  # per sample (k_i,) into its tokens
    n_text_total: int = 0  # tokens of each modality in the whole calibration set
    n_vision_total: int = 0

    @property
    def x(self) -> torch.Tensor:
        return torch.cat(self.rows)

    @property
    def text_mask(self) -> torch.Tensor:
        return torch.cat(self.text)


def sample_positions(text_masks: list[torch.Tensor], max_tokens: int, seed: int) -> list[torch.Tensor]:
    """Per sample, the token positions kept: all when the set has at most `max_tokens` tokens,
    else a seeded uniform subset (each token with the same chance, so both modalities keep
    their proportion)."""
    sizes = [m.numel() for m in text_masks]
    total = sum(sizes)
    if total <= max_tokens:
        return [torch.arange(n) for n in sizes]
    gen = torch.Generator().manual_seed(seed)
    keep = torch.zeros(total, dtype=torch.bool)
    keep[torch.randperm(total, generator=gen)[:max_tokens]] = True
    out, start = [], 0
    for n in sizes:
        out.append(torch.nonzero(keep[start : start + n]).reshape(-1))
        start += n
    return out


@dataclass
class TokenGradients:
    """|dL/dY| of one group's output: at the sampled rows (per sample (k_i, D_out)), and summed
    over every token and output channel of each modality (what MBQ's means need), so memory is
    that of the sampled rows, not of every token's gradient."""

    rows: list[torch.Tensor] = field(default_factory=list)
    text_sum: float = 0.0
    vision_sum: float = 0.0
    text_count: int = 0
    vision_count: int = 0

    def add(self, g: torch.Tensor, text_mask: torch.Tensor, positions: torch.Tensor) -> None:
        g = g.detach().abs().reshape(-1, g.shape[-1])
        m = text_mask.reshape(-1).to(g.device)
        self.rows.append(g[positions.to(g.device)].cpu())
        self.text_sum += float(g[m].sum())
        self.vision_sum += float(g[~m].sum())
        self.text_count += int(m.sum()) * g.shape[1]
        self.vision_count += int((~m).sum()) * g.shape[1]

    def modality_means(self) -> tuple[float, float]:
        """(|g_l|, |g_v|): the mean over the text / vision tokens and output channels."""
        return self.text_sum / max(self.text_count, 1), self.vision_sum / max(self.vision_count, 1)


class InputRecorder:
    """A forward pre-hook on a group's first member: keeps the sampled rows of its input."""

    def __init__(self, samples: GroupSamples, positions: list[torch.Tensor], mask: MaskHolder) -> None:
        self.samples, self.positions, self.mask = samples, positions, mask
        self.i = 0  # the sample being run (set by the caller)

    def __call__(self, module, args) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1])
        m = self.mask.mask.reshape(-1).cpu()
        pos = self.positions[self.i]
        self.samples.rows.append(x[pos.to(x.device)].float().cpu())
        self.samples.text.append(m[pos])
        self.samples.positions.append(pos)
        self.samples.n_text_total += int(m.sum())
        self.samples.n_vision_total += int((~m).sum())


class _GradRunner(GroupRunner):
    """A GroupRunner whose output keeps its gradient (the group output's dL/dY). The weights
    are constants (begin_step(False)); the graph runs through the inputs, so a later group's
    gradient reaches an earlier one's output."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._x is not x:
            y = super().__call__(x)
            if y.requires_grad:
                y.retain_grad()
            else:  # the first group: its input is a constant
                y.requires_grad_(True)
            self.outputs.append(y)
        return self._y


def plain_params(weight: torch.Tensor, bias, stats: ChannelStats, cfg: CalibrationConfig, gen) -> GroupParams:
    """RTN's parameters in the SplitQ format: one main set, unit smoothing, identity transforms."""
    empty = torch.zeros(0, dtype=torch.long)
    return GroupParams(weight, bias, empty, empty, stats, cfg, gen)


def token_gradients(
    work,
    calib: dict,
    params: dict[str, GroupParams],
    mask: MaskHolder,
    inputs,
    targets,
    positions: list[torch.Tensor],
    cfg: CalibrationConfig,
    device: torch.device,
) -> tuple[dict[str, TokenGradients], float]:
    """Per group, |dL/dY| of the group's output at the sampled `positions` of each sample and
    per modality (TokenGradients), with
    L = ||layer_q(x) - layer_fp(x)||^2 the layer's quantized forward (the given parameters, e.g.
    RTN) against the FP targets. Also returns that loss per output element (what
    method.train_groups logs as the initial loss)."""
    runners = {k: _GradRunner(p, cfg.quant_scheme, mask) for k, p in params.items()}
    for kind, mods in calib.items():
        for m in mods:
            m.runner = runners[kind]
    grads = {k: TokenGradients() for k in runners}
    total, count = 0.0, 0
    try:
        for r in runners.values():
            r.begin_step(False)
        for i in range(len(inputs.hidden)):
            for r in runners.values():
                r.outputs = []
            with torch.enable_grad():
                y = run_sample(work, mask, inputs, i, device)
                loss = ((y - targets[i].to(device=device, dtype=torch.float32)) ** 2).sum()
                loss.backward()
            total += float(loss.detach())
            count += y.numel()
            for k, r in runners.items():
                # one call per input: a group whose members share the input has one leaf
                got = [o.grad for o in r.outputs if o.grad is not None]
                if not got:
                    raise RuntimeError(f"no gradient reached the output of group {k}")
                g = sum(got)
                grads[k].add(g, inputs.text_masks[i], positions[i])
                r.clear()
    finally:
        for r in runners.values():
            r.end_step()
        for mods in calib.values():
            for m in mods:
                m.runner = None
    return grads, total / max(count, 1)


def layer_loss(work, calib: dict, params: dict[str, GroupParams], mask, inputs, targets, cfg, device) -> float:
    """Mean squared error of the layer's fake-quant forward (the given parameters) against the targets."""
    runners = {k: GroupRunner(p, cfg.quant_scheme, mask) for k, p in params.items()}
    for kind, mods in calib.items():
        for m in mods:
            m.runner = runners[kind]
    total, count = 0.0, 0
    try:
        for r in runners.values():
            r.begin_step(False)
        with torch.no_grad():
            for i in range(len(inputs.hidden)):
                y = run_sample(work, mask, inputs, i, device)
                total += float(((y - targets[i].to(device=device, dtype=torch.float32)) ** 2).sum())
                count += y.numel()
                for r in runners.values():
                    r.clear()
    finally:
        for r in runners.values():
            r.end_step()
        for mods in calib.values():
            for m in mods:
                m.runner = None
    return total / max(count, 1)
