"""An MBQ checkpoint (baselines/mbq.py: its scales are the SplitQ main smoothing) is served by
vLLM with the plugin and generates what the reference generates (one server start)."""

from __future__ import annotations

import pytest
import torch

from splitq_calibration import calibrate
from splitq_vllm.checkpoint.reader import read_checkpoint
from splitq_vllm.testing.conversations import CONVERSATIONS
from splitq_vllm.testing.images import write_sharegpt
from tests.helpers.engine import OpenAIServer, server_env
from tests.plugin.generation import Reference, assert_matches_reference, served_chat, server_args

pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("single_thread")]


@pytest.fixture(scope="module")
def ckpt(tiny_qwen_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("mbq")
    out = calibrate(tiny_qwen_dir, write_sharegpt(root / "data", n=6), root / "mbq-w4a4", method="mbq",
                    scheme="w4a4", num_samples=6)  # fmt: skip
    ck = read_checkpoint(out)
    smooth = [ck.layer(name).main_smooth for name in ck.quant_config.layers]
    assert all(not torch.allclose(s, torch.ones_like(s)) for s in smooth)  # the searched scales are in it
    return out


def test_mbq_checkpoint_is_served_like_the_reference(ckpt, tmp_path):
    reference = Reference(ckpt)
    with OpenAIServer(ckpt, server_args(), env=server_env(tmp_path)) as server:
        assert "SplitQ:" in server.logs()
        for name, (msgs, pngs) in CONVERSATIONS.items():
            assert_matches_reference(served_chat(server, msgs), reference, msgs, pngs, name)
