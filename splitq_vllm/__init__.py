"""splitq_vllm: the SplitQ checkpoint format and the vLLM plugin that serves it."""

__version__ = "0.1.0"
