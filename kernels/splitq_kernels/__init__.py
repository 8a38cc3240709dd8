"""splitq_kernels: the SplitQ linear layer, its plain-torch reference and its Triton kernels."""

__version__ = "0.1.0"
