"""The pipeline-parallel mask relay (splitq_vllm/plugin/pipeline.py) on two stand-in stages with
vLLM's own IntermediateTensors, moved between them the way the model runners do (into the
receiving stage's buffers from make_empty_intermediate_tensors). The served PP=2 test is
tests/plugin/test_parallel.py."""

from __future__ import annotations

import torch
from torch import nn
from vllm.sequence import IntermediateTensors

from splitq_vllm.plugin.pipeline import KEY, install_pipeline_relay
from splitq_vllm.plugin.text_mask import BUFFER_NAME, new_mask_buffer

HIDDEN = 8


class Stage(nn.Module):
    """A pipeline stage: returns IntermediateTensors unless it is the last; records what it got."""

    def __init__(self, last: bool) -> None:
        super().__init__()
        self.last = last
        self.seen: list[set[str]] = []

    def make_empty_intermediate_tensors(self, batch_size, dtype, device):
        return IntermediateTensors({k: torch.zeros(batch_size, HIDDEN, dtype=dtype, device=device) for k in ("hidden_states", "residual")})

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        if intermediate_tensors is not None:
            self.seen.append(set(intermediate_tensors.tensors))
            h = intermediate_tensors["hidden_states"] + 1
        else:
            h = inputs_embeds
        if self.last:
            return h
        return IntermediateTensors({"hidden_states": h, "residual": h})


def runner_copy(received: IntermediateTensors, stage: nn.Module, n: int) -> IntermediateTensors:
    """What V1's sync_and_gather_intermediate_tensors does: copy into persistent buffers, slice."""
    buffers = stage.make_empty_intermediate_tensors(64, torch.float32, "cpu")
    for k, v in received.items():
        buffers[k][:n].copy_(v[:n])
    return IntermediateTensors({k: v[:n] for k, v in buffers.items()})


def test_the_mask_reaches_every_stage_and_the_model_never_sees_the_entry():
    first, middle, last = Stage(False), Stage(False), Stage(True)
    masks = [new_mask_buffer(80) for _ in range(3)]
    for stage, mask in zip((first, middle, last), masks):
        install_pipeline_relay(stage, mask)
        assert stage._buffers[BUFFER_NAME] is mask
        assert KEY in stage.make_empty_intermediate_tensors(4, torch.float32, "cpu").tensors
    n = 13
    step = torch.tensor([True] * 3 + [False] * 6 + [True] * 4)  # text, 6 image rows, text
    masks[0][:n] = step  # what the embed hook writes on the first stage
    out = first(input_ids=None, positions=torch.arange(n), inputs_embeds=torch.randn(n, HIDDEN))
    assert torch.equal(out[KEY], step.to(torch.uint8))
    masks[0][:n] = True  # the next step rewrites the buffer while the send may be in flight
    assert torch.equal(out[KEY], step.to(torch.uint8))  # the sent rows are a copy

    out2 = middle(input_ids=None, positions=torch.arange(n), intermediate_tensors=runner_copy(out, middle, n))
    assert torch.equal(masks[1][:n], step) and middle.seen == [{"hidden_states", "residual"}]
    assert torch.equal(out2[KEY], step.to(torch.uint8))  # relayed on to the next stage
    # positional intermediate tensors, as a direct call would pass them
    y = last(None, torch.arange(n), runner_copy(out2, last, n))
    assert torch.equal(masks[2][:n], step) and last.seen == [{"hidden_states", "residual"}]
    assert isinstance(y, torch.Tensor)  # the last stage returns hidden states, nothing added
