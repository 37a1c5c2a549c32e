"""The built-in hardware probe: the CPU, always. GPU probes (NVIDIA, ROCm, Vulkan,
Metal) are the `dmr-gpus` plugin in plugins/gpus (docs/scheduler.md)."""
