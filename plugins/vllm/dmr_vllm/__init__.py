"""vLLM engine for dmr: safetensors models served by vLLM's OpenAI server.

Only `dmr_vllm.launch` runs beside vLLM; everything else runs inside `dmr serve`,
which must never import vllm or torch.
"""
