"""Let the CUDA build of torchvision import beside the CPU build of torch (CPU dev venv only).

torchvision's C++ extension cannot load beside torch+cpu, and then its `_meta_registrations`
registers fake kernels for `torchvision::nms`/`qnms`, ops that were never defined, and the import
dies. Defining the two schemas first is enough for what vLLM and transformers use
(`torchvision.transforms.v2`). The setup script copies this file into the venv's site-packages
with a `.pth` line that installs the hook; the hook imports torch only when torchvision is first
imported, so other Python start-ups stay fast.
"""

import importlib.abc
import sys


class _DefineTorchvisionOps(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        try:
            lib = torch.library.Library("torchvision", "DEF")
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            # Keep the library alive: dropping it would undefine the ops.
            sys.modules[__name__]._torchvision_lib = lib
        except RuntimeError:
            pass  # already defined (the real extension loaded): nothing to fix
        return None  # let the normal finders import torchvision


def install() -> None:
    if not any(isinstance(f, _DefineTorchvisionOps) for f in sys.meta_path):
        sys.meta_path.insert(0, _DefineTorchvisionOps())
