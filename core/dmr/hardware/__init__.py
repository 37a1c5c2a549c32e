"""Hardware probes (built-in plugins): CPU always, NVIDIA through NVML when present."""
