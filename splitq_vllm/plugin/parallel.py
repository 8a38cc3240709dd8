"""Which parallel settings a SplitQ model is served with, and the refusals of the others.

Served (docs/vllm_plugin.md, "Serving across GPUs"):
- tensor parallelism: column-parallel layers (qkv, gate_up) shard their outputs (output-side
  tensors split by vLLM's loaders, input-side tensors replicated); row-parallel layers (o_proj,
  down_proj) all-gather their input and each rank multiplies its block of the main K range
  (splitq_kernels.reference.shard), so every TP size gives the TP=1 numerics from one checkpoint;
- pipeline parallelism: the text mask travels with the intermediate tensors (pipeline.py);
- data parallelism: nothing to do (each engine is a TP=1 model).
Refused, each with a message naming the setting: speculative decoding (drafter forwards do not
update the mask), micro-batching (--enable-dbo / --ubatch-size: the layers would see a row slice
of the step's mask), prefill context parallelism (the layers see a token slice), a TP size that
does not divide the language model's heads, KV heads or intermediate size, a TP size that
leaves a rank of a row-parallel layer without main channels (from the checkpoint's layer dims in
the front end, and per layer when it is built), and TP > 1 with a quantized vision tower split
across ranks (served with --mm-encoder-tp-mode data: the tower replicated, each rank runs whole
images, vLLM's data-parallel encoder).

`check_parallel` runs in the front end (a wrapper of vLLM's ModelConfig.verify_with_parallel_config,
installed by `register()`, so a bad setting fails in seconds, before any worker starts) and again
in each worker when the model is built.
"""

from __future__ import annotations

import functools
from typing import Any

from splitq_kernels.reference.shard import ShardError, main_k_shards  # noqa: F401  (re-exported)

_HOOK_FLAG = "_splitq_parallel_check"


class ParallelConfigError(ValueError):
    """A parallel setting SplitQ cannot serve (the message names it)."""


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    return getattr(cfg, name, default) if cfg is not None else default


ROW_PARALLEL_KINDS = ("o", "down")  # group kinds (splitq_vllm.model_layout) vLLM builds as RowParallelLinear


def _checkpoint_layers(quantization_config: Any) -> dict[str, Any]:
    """{checkpoint layer: its dims} of a quantization_config (a dict or a transformers
    QuantizationConfig object); {} when it is not a readable SplitQ config: the checkpoint checks
    report that."""
    from splitq_vllm.checkpoint import SplitQConfig

    if hasattr(quantization_config, "to_dict"):  # a transformers QuantizationConfig object
        quantization_config = quantization_config.to_dict()
    try:
        return SplitQConfig.from_dict(quantization_config).layers
    except Exception:  # noqa: BLE001
        return {}


def _row_parallel(layers: dict[str, Any]) -> dict[str, int]:
    return {name: d.main for name, d in layers.items() if d.group.rsplit(".", 1)[-1] in ROW_PARALLEL_KINDS}


def row_parallel_mains(quantization_config: Any) -> dict[str, int]:
    """{checkpoint layer: main channels} of the row-parallel layers of a quantization_config
    ({} when it is not a readable SplitQ config)."""
    return _row_parallel(_checkpoint_layers(quantization_config))


def check_parallel(parallel_config: Any, hf_text_config: Any, speculative_config: Any = None,
                   hf_vision_config: Any = None, mm_encoder_tp_mode: str | None = None,
                   row_parallel: dict[str, int] | None = None, tower_layers: list[str] | None = None) -> None:
    """Raise ParallelConfigError for a parallel setting SplitQ cannot serve (module doc).
    row_parallel: {layer: main channels} of the row-parallel layers (their blocks are checked);
    tower_layers: the checkpoint's quantized vision-tower layers."""
    if speculative_config is not None:
        raise ParallelConfigError(
            "SplitQ: speculative decoding (--speculative-config) is not supported: drafter forwards do not update "
            "the text/vision token mask of the SplitQ layers"
        )
    if _get(parallel_config, "enable_dbo", False) or _get(parallel_config, "ubatch_size", 0) > 1:
        raise ParallelConfigError(
            "SplitQ: micro-batching (--enable-dbo / --ubatch-size) is not supported: each micro-batch would read "
            "the rows of the whole step's text/vision token mask"
        )
    pcp = _get(parallel_config, "prefill_context_parallel_size", 1)
    if pcp > 1:
        raise ParallelConfigError(
            f"SplitQ: --prefill-context-parallel-size {pcp} is not supported: each rank would compute a slice of "
            "the step's tokens against the whole step's text/vision token mask"
        )
    tp = _get(parallel_config, "tensor_parallel_size", 1)
    if tp <= 1:
        return
    heads = _get(hf_text_config, "num_attention_heads")
    kv = _get(hf_text_config, "num_key_value_heads", heads)
    inter = _get(hf_text_config, "intermediate_size")
    if heads and heads % tp:
        raise ParallelConfigError(
            f"SplitQ: --tensor-parallel-size {tp} does not divide the language model's {heads} attention heads; "
            f"sizes that do: {[s for s in range(1, heads + 1) if heads % s == 0]}"
        )
    if kv and kv % tp and tp % kv:
        raise ParallelConfigError(
            f"SplitQ: --tensor-parallel-size {tp} neither divides the language model's {kv} KV heads nor is a "
            "multiple of them (vLLM splits or replicates whole KV heads)"
        )
    if inter and inter % tp:
        raise ParallelConfigError(
            f"SplitQ: --tensor-parallel-size {tp} does not divide the language model's intermediate size {inter} "
            "(gate_up_proj / down_proj are split across ranks)"
        )
    for name, main in (row_parallel or {}).items():
        row_shard(name, main, tp, 0)
    if tower_layers and mm_encoder_tp_mode != "data":
        # the tower's fused attn.qkv is one checkpoint layer: vLLM would split its rows per rank
        # into q/k/v blocks, which the SplitQ method does not shard (the LM's q/k/v are separate)
        raise ParallelConfigError(
            f"SplitQ: --tensor-parallel-size {tp} with a quantized vision tower ({len(tower_layers)} layers, e.g. "
            f"'{tower_layers[0]}'): the SplitQ tower is served replicated on every rank only; add "
            "--mm-encoder-tp-mode data"
        )
    vheads = _get(hf_vision_config, "num_heads")
    if vheads and vheads % tp and mm_encoder_tp_mode != "data":
        raise ParallelConfigError(
            f"SplitQ: --tensor-parallel-size {tp} does not divide the vision tower's {vheads} heads; serve with "
            "--mm-encoder-tp-mode data (the vision tower replicated on every rank)"
        )


def check_vllm_config(model_config: Any, parallel_config: Any, speculative_config: Any = None) -> None:
    """check_parallel on vLLM's config objects (front end and workers)."""
    from splitq_vllm.families import is_vision_tower_layer

    hf = model_config.hf_config
    mm = _get(model_config, "multimodal_config")
    layers = _checkpoint_layers(_get(hf, "quantization_config"))  # read once for both checks
    check_parallel(
        parallel_config,
        model_config.hf_text_config,
        speculative_config,
        hf_vision_config=_get(hf, "vision_config"),
        mm_encoder_tp_mode=_get(mm, "mm_encoder_tp_mode"),
        row_parallel=_row_parallel(layers),
        tower_layers=[name for name in layers if is_vision_tower_layer(name)],
    )


def row_shard(layer_name: str, main: int, tp_size: int, tp_rank: int):
    """The KShard of `tp_rank` for a row-parallel layer; a TP size that leaves a rank empty raises
    ParallelConfigError naming the setting, the layer, its main channels and the sizes that work."""
    try:
        return main_k_shards(main, tp_size, layer=layer_name)[tp_rank]
    except ShardError as e:
        raise ParallelConfigError(f"SplitQ: --tensor-parallel-size {tp_size}: {e}") from e


def install_front_end_check() -> None:
    """Wrap ModelConfig.verify_with_parallel_config: SplitQ models get check_vllm_config too
    (idempotent). vLLM calls it in VllmConfig.__post_init__, in the front end, before any engine
    or worker process starts."""
    from vllm.config.model import ModelConfig

    original = ModelConfig.verify_with_parallel_config
    if getattr(original, _HOOK_FLAG, False):
        return

    @functools.wraps(original)
    def verify_with_parallel_config(self, parallel_config):
        original(self, parallel_config)
        if (getattr(self, "quantization", None) or "") == "splitq":
            check_vllm_config(self, parallel_config)

    setattr(verify_with_parallel_config, _HOOK_FLAG, True)
    ModelConfig.verify_with_parallel_config = verify_with_parallel_config
