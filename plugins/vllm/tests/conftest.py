"""The vLLM plugin's unit tests need neither vllm nor torch: bundles are written by hand."""
