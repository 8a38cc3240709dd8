"""`--quantization splitq`: the vLLM QuantizationConfig of a SplitQ checkpoint.

Built in the front end from config.json's `quantization_config` (vLLM picks this class from
`quant_method: "splitq"`, so the flag is optional) through the format's own parser
`SplitQConfig.from_dict`, then pickled to the engine core and the workers: it holds only the
parsed config and name tables (the runtime mask buffer is created in the worker, never pickled).

Names: the checkpoint keys its layers by the Hugging Face file names (`model.layers.0.self_attn.
q_proj` for Qwen2.5-VL, `language_model.model.layers.0...` for llava-hf). vLLM asks about its own
module prefixes (`language_model.model.layers.0.self_attn.qkv_proj`): the model's
`hf_to_vllm_mapper` (passed to `apply_vllm_mapper`) renames the file names, and the model's
`packed_modules_mapping` unfuses `qkv_proj` -> q/k/v_proj, `gate_up_proj` -> gate/up_proj. A linear
whose members are all quantized layers of the checkpoint gets the SplitQ method; one with none
runs unquantized (the ignore list: vision tower, projector, lm_head by default); a mix is an error.

Vision tower (a checkpoint calibrated with `quantize_vision_tower`, Qwen2.5-VL): vLLM's tower
linears (`visual.blocks.N.attn.qkv`, the checkpoint's fused layer as one member; `attn.proj`;
`mlp.gate_up_proj` = gate/up_proj; `mlp.down_proj`) get the SplitQ method with `all_vision`:
their rows are patches, every one a vision row (as in calibration and the reference), so they
pass an all-False mask of their own row count and never read the language model's per-step
buffer. At --tensor-parallel-size > 1 the tower must be replicated (--mm-encoder-tp-mode data,
parallel.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase

from splitq_vllm.checkpoint import CheckpointError, SplitQCheckpoint, SplitQConfig, matches_ignore
from splitq_vllm.families import check_tower_quantization, family_of_config, family_of_vllm, is_vision_tower_layer

from .backends import decode_mode, product_precision, requested_backend, triton_available
from .parallel import check_vllm_config
from .text_mask import install_embed_hook, mask_mode, new_mask_buffer

logger = init_logger(f"vllm.{__name__}")  # under "vllm" so that vLLM's log handler shows it

MASK_MARGIN_ROWS = 256  # on top of max_num_batched_tokens (padding, look-ahead slots)


@register_quantization_config("splitq")
class SplitQVllmConfig(QuantizationConfig):
    """The checkpoint's quantization_config, seen by vLLM."""

    def __init__(self, splitq: SplitQConfig | None = None) -> None:
        super().__init__()
        if splitq is None:
            raise CheckpointError(
                "--quantization splitq needs a SplitQ checkpoint: config.json has no quantization_config "
                "with quant_method 'splitq' (write one with splitq_calibration)"
            )
        self.splitq = splitq
        # vision-tower linears (quantize_vision_tower): served with an all-vision mask of their own
        self.tower_layers: list[str] = [name for name in splitq.layers if is_vision_tower_layer(name)]
        self.checkpoint_dir: str | None = None
        # HF file name -> the name vLLM uses for that module (updated by apply_vllm_mapper)
        self.layer_names: dict[str, str] = {name: name for name in splitq.layers}
        self.ignore: list[str] = list(splitq.ignore)
        self._by_vllm: dict[str, str] | None = None
        self._runtime_checked = False
        self._mask: torch.Tensor | None = None  # worker-side only

    # -- pickling: the mask buffer lives in the worker that built the model ----------------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_mask"] = None
        state["_runtime_checked"] = False
        return state

    # -- QuantizationConfig API ---------------------------------------------------------------
    def get_name(self) -> str:
        return "splitq"

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70  # the reference runs anywhere torch does; the Triton kernels check their own needs

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # quantization_config lives in config.json

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "SplitQVllmConfig":
        return cls(SplitQConfig.from_dict(config, source="config.json: quantization_config"))

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None) -> None:
        """Front end, before any process starts: check the files' headers (every tensor, shape, dtype)."""
        mask_mode()  # a bad SPLITQ_TEXT_MASK fails here, not at the first request
        decode_mode()  # likewise SPLITQ_DECODE_MODE
        product_precision()  # and SPLITQ_PRECISION
        if hf_config is not None and self.tower_layers:
            try:
                family = family_of_config(hf_config)
            except ValueError:
                family = None  # an unsupported architecture is refused by name when the model is built
            if family is not None:
                check_tower_quantization(family, self.tower_layers)
        if hf_config is not None:
            # vLLM keys its torch.compile cache on the model config (quantization_config included),
            # not on environment variables: record the backend choice there, so that a graph traced
            # with one backend is never reused for another.
            hf_config.splitq_backend = (f"{requested_backend()}:triton={triton_available()}:decode={decode_mode()}"
                                        f":precision={product_precision()}")
        path = Path(model_name)
        if not path.is_dir():
            logger.info("SplitQ: %s is not a local directory; tensors are checked while loading", model_name)
            return
        self.checkpoint_dir = str(path)
        ckpt = SplitQCheckpoint(path)
        ckpt.validate(check_values=False)
        logger.info(
            "SplitQ: %s, %d quantized layers (%s; %d in the vision tower), files checked",
            path,
            len(self.splitq.layers),
            self.splitq.scheme.name,
            len(self.tower_layers),
        )

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        def rename(name: str) -> str:
            mapped = hf_to_vllm_mapper.map_name(name)
            return name if mapped is None else mapped

        self.layer_names = {hf: rename(cur) for hf, cur in self.layer_names.items()}
        self._by_vllm = None
        self.ignore = [p if p.startswith("re:") else rename(p) for p in self.ignore]

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod

        if not isinstance(layer, LinearBase):
            return None  # embeddings, lm_head, attention: unquantized
        self._check_runtime()
        members = self._members(prefix)
        if members is None:
            if not self._is_ignored(prefix):
                self._check_not_misnamed(prefix)
                logger.warning_once(
                    "SplitQ: linear '%s' is neither quantized nor in the ignore list; it runs unquantized", prefix
                )
            return UnquantizedLinearMethod()
        from .linear import Member, SplitQLinearMethod

        # a vision-tower linear sees patch rows, not the scheduled tokens: all vision, no mask buffer
        # (the members of one vLLM layer share its parent module, so they are all tower or none)
        all_vision = is_vision_tower_layer(members[0])
        return SplitQLinearMethod(
            prefix,
            [Member(hf, self.splitq.layers[hf]) for hf in members],
            self.splitq.scheme,
            self.text_mask_buffer,
            all_vision=all_vision,
        )

    # -- helpers --------------------------------------------------------------------------------
    def _members(self, prefix: str) -> list[str] | None:
        """HF names of the checkpoint layers behind vLLM layer `prefix`, or None if unquantized."""
        parent, _, proj = prefix.rpartition(".")
        shards = self.packed_modules_mapping.get(proj, [proj])
        wanted = [f"{parent}.{s}" if parent else s for s in shards]
        if self._by_vllm is None:
            self._by_vllm = {v: hf for hf, v in self.layer_names.items()}
        by_vllm = self._by_vllm
        found = [by_vllm.get(w) for w in wanted]
        if all(f is None for f in found):
            return None
        if any(f is None for f in found):
            missing = [w for w, f in zip(wanted, found) if f is None]
            raise CheckpointError(
                f"SplitQ: vLLM fuses {wanted} into '{prefix}', but the checkpoint quantizes only some of them "
                f"(not quantized: {missing}); a fused layer must be quantized as a whole"
            )
        groups = {self.splitq.layers[f].group for f in found}
        if len(groups) != 1:
            raise CheckpointError(f"SplitQ: layers {found} are fused by vLLM as '{prefix}' but have groups {sorted(groups)}")
        return found  # type: ignore[return-value]

    def _check_not_misnamed(self, prefix: str) -> None:
        """A non-ignored linear without checkpoint layer, while the checkpoint quantizes a layer with
        the same `layers.N.<module>.<proj>` tail: the name mapping missed (the model would load the
        SplitQ tensors into an unquantized layer); say so instead of failing obscurely later."""
        parent, _, proj = prefix.rpartition(".")
        tails = [".".join(f"{parent}.{s}".split(".")[-4:]) for s in self.packed_modules_mapping.get(proj, [proj])]
        hits = [hf for hf, v in self.layer_names.items() if any(v.endswith("." + t) for t in tails)]
        if hits:
            raise CheckpointError(
                f"SplitQ: vLLM layer '{prefix}' matches no quantized layer of the checkpoint by name, but the "
                f"checkpoint has {hits[:3]} (mapped to {[self.layer_names[h] for h in hits[:3]]}): the model's "
                "name mapping (hf_to_vllm_mapper / packed_modules_mapping) does not fit this checkpoint"
            )

    def _is_ignored(self, prefix: str) -> bool:
        return matches_ignore(prefix, self.ignore)

    def text_mask_buffer(self, vllm_config=None, device: torch.device | None = None) -> torch.Tensor:
        """The model's one mask buffer (created at the first SplitQ layer, on the current device,
        or by the pipeline relay of a stage without SplitQ layers)."""
        if self._mask is None:
            if vllm_config is None:
                from vllm.config import get_current_vllm_config

                vllm_config = get_current_vllm_config()
            rows = vllm_config.scheduler_config.max_num_batched_tokens + MASK_MARGIN_ROWS
            self._mask = new_mask_buffer(rows, device)
        return self._mask

    def _check_runtime(self) -> None:
        """Once per process, when the model is built: refuse what the mask design cannot serve."""
        if self._runtime_checked:
            return
        from vllm.config import get_current_vllm_config
        from vllm.model_executor.model_loader.utils import get_model_architecture

        from .text_mask import check_model_class

        install_embed_hook()  # idempotent; register() normally did it already
        cfg = get_current_vllm_config()
        # tensor / pipeline / data parallelism are served (parallel.py); the rest is refused there
        check_vllm_config(cfg.model_config, cfg.parallel_config, cfg.speculative_config)
        inductor = cfg.compilation_config.inductor_compile_config or {}
        if inductor.get("freezing") or inductor.get("max_autotune"):
            raise NotImplementedError(
                "SplitQ: inductor freezing (also turned on by max_autotune on the CPU) would constant-fold the "
                "text/vision token mask buffer; leave freezing and max_autotune off"
            )
        model_cls = get_model_architecture(cfg.model_config)[0]
        check_model_class(model_cls)
        check_tower_quantization(family_of_vllm(model_cls), self.tower_layers)
        self._runtime_checked = True
        logger.info("SplitQ: text mask mode %s", mask_mode())
