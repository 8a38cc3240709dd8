"""What the subprocess bodies linear_cases.py and tower_cases.py share: vLLM's layers built
without an engine (a current VllmConfig and a one-rank process group), and the engine-config
checks run on a checkpoint under several parallel settings.

Imported by those scripts as a sibling module (they run as `python tests/plugin/X_cases.py`, so
this folder is first on sys.path)."""

from __future__ import annotations

from typing import Any

_ENTERED: list[Any] = []


def init_single_rank() -> None:
    """Enter a default VllmConfig (no model) and initialise a one-rank model-parallel group (gloo, TP = PP = 1)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    from splitq_vllm.server import free_port

    ctx = set_current_vllm_config(VllmConfig())
    ctx.__enter__()
    _ENTERED.append(ctx)  # held for the whole script: a dropped context manager exits when collected
    init_distributed_environment(
        world_size=1, rank=0, distributed_init_method=f"tcp://127.0.0.1:{free_port()}", local_rank=0, backend="gloo"
    )
    initialize_model_parallel(1, 1)


def engine_config_refusals(ckpt_dir: str, variants: dict[str, dict[str, Any]]) -> dict[str, str | None]:
    """{variant: None if vLLM's engine config with those EngineArgs passes the SplitQ runtime checks,
    else "ErrorType: message"}."""
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs

    out: dict[str, str | None] = {}
    for name, kw in variants.items():
        try:
            cfg = EngineArgs(model=ckpt_dir, max_model_len=1024, **kw).create_engine_config()
            with set_current_vllm_config(cfg):
                cfg.quant_config._check_runtime()
            out[name] = None
        except (NotImplementedError, ValueError) as e:
            out[name] = f"{type(e).__name__}: {e}"
    return out
