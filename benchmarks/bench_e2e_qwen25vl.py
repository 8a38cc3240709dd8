#!/usr/bin/env python
"""End-to-end SplitQ vs BF16 on the language model of Qwen2.5-VL-7B (the paper's Tables 7 and 12).

    python benchmarks/bench_e2e_qwen25vl.py                  # GPU: batch 1 and 8, 2048-token prefill, 32-token decode
    python benchmarks/bench_e2e_qwen25vl.py --batches 1 --decode 16
    python benchmarks/bench_e2e_qwen25vl.py --cpu-check      # CPU: tiny model, interpreter, every linear call checked

The model is transformers' Qwen2_5_VLForConditionalGeneration built from Qwen2.5-VL-7B's config
(notes/anchors.md shapes; random weights, nothing downloaded). The BF16 model is timed first; then
every decoder linear (q/k/v fused as qkv, o_proj, gate/up fused as gate_up, down_proj) is replaced
by the SplitQ kernel path with random quantized layers of the right shapes and the default split
(2% text + 2% vision outliers, main a multiple of 64, CWS rank 2%, MAC rank 3%; W4A4), the bf16
weights are freed, and the same runs are timed again. The vision tower and lm_head stay BF16 and
the prompts are text token ids (the vision tower is not run); the SplitQ layers get a text mask
marking the first 60% of each prompt as image tokens (an image-heavy prompt: MAC applies to the
rest; the mask changes no cost). Measured per batch size: prefill latency (one forward over
batch x 2048 tokens, logits of the last position only), decode latency per token (greedy
generate of --decode tokens minus its prefill; transformers' eager decode loop, so Python overhead
is included in both variants alike), peak memory of each phase and resident weight memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

from splitq_vllm.testing.published import text_config_kwargs, vision_config_kwargs

# Qwen2.5-VL-7B-Instruct's config.json (kept once, in splitq_vllm.testing.published)
QWEN25VL_7B_TEXT = text_config_kwargs("qwen2.5-vl-7b")
QWEN25VL_7B_VISION = vision_config_kwargs("qwen2.5-vl-7b")
TINY_TEXT = dict(
    vocab_size=512, hidden_size=160, intermediate_size=336, num_hidden_layers=2, num_attention_heads=5,
    num_key_value_heads=1, max_position_embeddings=4096, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]},
    tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=0,
)
TINY_VISION = dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=160)


def log(*a) -> None:
    print(*a, flush=True)


def build_model(text: dict, vision: dict, dtype: torch.dtype, device: torch.device):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    special = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                   vision_end_token_id=151653)
    if text["vocab_size"] < 151656:  # tiny model: special ids inside its vocabulary (never used: text-only prompts)
        special = dict(image_token_id=2, video_token_id=3, vision_start_token_id=4, vision_end_token_id=5)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **special)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build the parameters in the target dtype directly
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(prev)
    return model.to(dtype).eval()


# ---------------------------------------------------------------------------------------------
# SplitQ modules
# ---------------------------------------------------------------------------------------------


class TextMask:
    """The per-row text mask every SplitQ layer reads (as the vLLM plugin's persistent buffer):
    set before each forward; decode steps see all-text rows."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None  # flattened [rows] bool, or None = all text

    def rows(self, n: int, device) -> torch.Tensor | None:
        if self.mask is None or self.mask.numel() != n:
            return None  # decode steps (and anything else): all text
        return self.mask


class SplitQLinear(torch.nn.Module):
    """One fused SplitQ linear; `parts` slices of its output stand in for the model's separate
    q/k/v (gate/up) projections, which transformers calls one after another on the same tensor:
    the first call computes the fused output, the others reuse it."""

    def __init__(self, kl, layer, scheme, mask: TextMask, check: bool) -> None:
        super().__init__()
        self.kl, self.layer, self.scheme, self.mask, self.check = kl, layer, scheme, mask, check
        self.n_parts = 1
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        self._served = 0
        self.calls = 0

    def fused(self, x: torch.Tensor) -> torch.Tensor:
        if self._last is not None and self._last[0] is x:
            y = self._last[1]
            self._served += 1
            if self._served == self.n_parts:  # every part has its slice: do not pin the activation
                self._last = None
            return y
        from splitq_kernels.ops import splitq_linear_triton

        x2 = x.reshape(-1, x.shape[-1])
        mask = self.mask.rows(x2.shape[0], x.device)
        if self.check:
            y2 = self._checked(x2, mask)
        else:
            y2 = splitq_linear_triton(x2, mask, self.kl)
        y = y2.reshape(*x.shape[:-1], -1)
        self._last, self._served = ((x, y), 1) if self.n_parts > 1 else (None, 0)
        self.calls += 1
        return y

    def _checked(self, x2: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        from splitq_kernels.testing import check_linear
        from splitq_kernels.triton.gemm import gemm_triton
        from splitq_kernels.triton.quantize_decode import can_implement_decode, quantize_input_decode_triton
        from splitq_kernels.triton.quantize_input import quantize_input_triton

        full = torch.ones(x2.shape[0], dtype=torch.bool, device=x2.device) if mask is None else mask
        # kernel (a) as the op runs it (the split decode launches at <= 16 rows), with the MAC codes kept
        ok = can_implement_decode(self.kl, x2.shape[0])[0]
        act = (quantize_input_decode_triton if ok else quantize_input_triton)(x2, mask, self.kl, store_mac=True)
        y = gemm_triton(act, self.kl, x2.dtype)
        check_linear(y, act, x2, full, self.layer, self.scheme, self.kl)
        return y


class Part(torch.nn.Module):
    def __init__(self, fused: SplitQLinear, start: int, end: int) -> None:
        super().__init__()
        self.fused, self.start, self.end = fused, start, end

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.fused(x)[..., self.start : self.end]


def replace_linears(model, scheme, device, precision: str, mask: TextMask, check: bool, main_multiple: int,
                    outlier_frac: float) -> list[SplitQLinear]:
    """Swap every decoder linear for SplitQ. One random quantized layer is drawn per shape and its
    kernel tensors are cloned for every decoder layer (real memory and cold weights, without drawing
    7B random codes 28 times on the CPU)."""
    from splitq_kernels.layout import prepare_kernel_layer
    from splitq_vllm.testing.layers import default_layer_dims, random_quantized_layer

    text = model.config.text_config
    h, i = text.hidden_size, text.intermediate_size
    q = text.num_attention_heads * (h // text.num_attention_heads)
    kv = text.num_key_value_heads * (h // text.num_attention_heads)
    shapes = {"qkv": (h, q + 2 * kv, True), "o": (q, h, False), "gate_up": (h, 2 * i, False), "down": (i, h, False)}
    prepared = {}
    for name, (d_in, d_out, bias) in shapes.items():
        dims = default_layer_dims(d_in, d_out, outlier_frac=outlier_frac, main_multiple=main_multiple)
        layer = random_quantized_layer(d_in, d_out, scheme=scheme, bias=bias, seed=len(prepared), **dims).to(device)
        kl = prepare_kernel_layer(layer, scheme, device, precision=precision)  # packs on the device
        prepared[name] = (layer if check else None, kl)  # the reference layer only when checking
        log(f"  {name}: {d_in} -> {d_out}, split {dims}")

    def fresh(name: str) -> SplitQLinear:
        layer, kl = prepared[name]
        clone = dataclasses.replace(kl, **{f.name: getattr(kl, f.name).clone() for f in dataclasses.fields(kl)
                                           if isinstance(getattr(kl, f.name), torch.Tensor)})
        return SplitQLinear(clone, layer, scheme, mask, check)

    modules = []
    for decoder in model.model.language_model.layers:
        attn, mlp = decoder.self_attn, decoder.mlp
        qkv, o, gate_up, down = fresh("qkv"), fresh("o"), fresh("gate_up"), fresh("down")
        attn.q_proj, attn.k_proj, attn.v_proj = Part(qkv, 0, q), Part(qkv, q, q + kv), Part(qkv, q + kv, q + 2 * kv)
        attn.o_proj = Part(o, 0, h)
        mlp.gate_proj, mlp.up_proj = Part(gate_up, 0, i), Part(gate_up, i, 2 * i)
        mlp.down_proj = Part(down, 0, h)
        qkv.n_parts, gate_up.n_parts = 3, 2
        modules += [qkv, o, gate_up, down]
    return modules


# ---------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> tuple[float, float]:
    """(best wall time in ms over `repeats` runs after one warm-up, peak memory in GiB)."""
    if device.type == "cuda":  # warm-up: Triton compiles, cuBLAS picks its kernels
        fn()
        sync(device)
    best = float("inf")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return best * 1e3, peak


def run_phase(model, label: str, batches, seq: int, decode: int, mask: TextMask, device, vocab: int,
              repeats: int) -> list[dict]:
    rows = []
    for b in batches:
        gen = torch.Generator().manual_seed(b)
        ids = torch.randint(0, min(vocab, 150000), (b, seq), generator=gen).to(device)
        prompt_mask = (torch.arange(seq) >= int(0.6 * seq)).repeat(b).to(device)  # 60% image tokens per prompt

        def prefill():
            mask.mask = prompt_mask
            with torch.no_grad():
                return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits

        def generate():
            mask.mask = prompt_mask
            with torch.no_grad():
                return model.generate(input_ids=ids, max_new_tokens=decode, min_new_tokens=decode, do_sample=False,
                                      attention_mask=torch.ones_like(ids))

        try:
            t_prefill, m_prefill = timed(prefill, device, repeats)
            t_gen, m_gen = timed(generate, device, 1) if decode else (float("nan"), float("nan"))
        except torch.cuda.OutOfMemoryError as e:
            log(f"  {label} batch {b}: out of memory ({e})")
            continue
        r = {"variant": label, "batch": b, "seq": seq, "prefill_ms": t_prefill, "prefill_peak_gib": m_prefill,
             "decode_ms_per_token": (t_gen - t_prefill) / decode if decode else None, "generate_peak_gib": m_gen}
        rows.append(r)
        log(f"  {label:6s} batch {b}: prefill {t_prefill:8.1f} ms (peak {m_prefill:5.1f} GiB), "
            f"decode {r['decode_ms_per_token'] or float('nan'):7.2f} ms/token (peak {m_gen:5.1f} GiB)")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scheme", default="w4a4")
    ap.add_argument("--precision", default="tf32x3")
    ap.add_argument("--cpu-check", action="store_true",
                    help="tiny model on the CPU through the interpreter; every SplitQ call checked against the reference")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    if args.cpu_check:
        import splitq_kernels.triton as skt

        skt.use_interpreter()
    from splitq_kernels.reference import SplitQScheme

    scheme = SplitQScheme.from_name(args.scheme)
    device = torch.device("cpu" if args.cpu_check else "cuda")
    batches = [int(b) for b in args.batches.split(",")]
    if args.cpu_check:
        text, vision, seq, decode, repeats, batches = TINY_TEXT, TINY_VISION, 24, 2, 1, [2]
        dtype, main_multiple, outlier_frac = torch.bfloat16, 16, 0.05
    else:
        text, vision, seq, decode, repeats = QWEN25VL_7B_TEXT, QWEN25VL_7B_VISION, args.seq, args.decode, args.repeats
        dtype, main_multiple, outlier_frac = torch.bfloat16, 64, 0.02
    import transformers
    import triton

    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "scheme": args.scheme, "precision": args.precision,
            "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    log(f"Qwen2.5-VL{'-7B' if not args.cpu_check else ' (tiny)'} language model, SplitQ vs BF16: {json.dumps(info)}")
    t0 = time.time()
    model = build_model(text, vision, dtype, device)
    mask = TextMask()
    weights = lambda: torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")  # noqa: E731
    results = {"info": info, "weights_gib": {}, "rows": []}
    results["weights_gib"]["bf16"] = weights()
    log(f"built in {time.time() - t0:.0f}s; resident {results['weights_gib']['bf16']:.2f} GiB")
    results["rows"] += run_phase(model, "bf16", batches, seq, decode, mask, device, text["vocab_size"], repeats)
    modules = replace_linears(model, scheme, device, args.precision, mask, args.cpu_check, main_multiple, outlier_frac)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    results["weights_gib"]["splitq"] = weights()
    log(f"SplitQ linears in place; resident {results['weights_gib']['splitq']:.2f} GiB")
    results["rows"] += run_phase(model, "splitq", batches, seq, decode, mask, device, text["vocab_size"], repeats)
    if args.cpu_check:
        calls = sum(m.calls for m in modules)
        if len({m.calls for m in modules}) != 1:  # q/k/v (gate/up) must share one fused call
            raise SystemExit(f"cpu-check: uneven SplitQ call counts {[m.calls for m in modules]}")
        log(f"cpu-check: {calls} SplitQ linear calls checked against the reference (prefill and decode): ok")
    for b in batches:
        base = next((r for r in results["rows"] if r["variant"] == "bf16" and r["batch"] == b), None)
        sq = next((r for r in results["rows"] if r["variant"] == "splitq" and r["batch"] == b), None)
        if base and sq:
            log(f"batch {b}: prefill x{base['prefill_ms'] / sq['prefill_ms']:.2f} faster, decode "
                f"x{base['decode_ms_per_token'] / sq['decode_ms_per_token']:.2f}, peak memory "
                f"x{base['prefill_peak_gib'] / sq['prefill_peak_gib']:.2f} less (prefill), weights "
                f"x{results['weights_gib']['bf16'] / results['weights_gib']['splitq']:.2f} less")
    out = args.json or (os.path.join(os.environ["OUT"], "bench_e2e_qwen25vl.json") if os.environ.get("OUT") else None)
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
        log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
