"""The engines dmr ships as plugins, and what installs each one.

`GET /engines/status` reports them as "Not Installed" when their plugin is
missing (as Docker Model Runner reports its backends), and a model whose engine
is missing is refused with the same hint. The plugins live in a dmr checkout's
`plugins/` folder and are installed from there, as the README does.
"""

from __future__ import annotations

__all__ = ["INSTALL_HINTS", "install_hint"]

INSTALL_HINTS: dict[str, str] = {
    "llama.cpp": "pip install -e plugins/llamacpp",
    "vllm": "pip install -e 'plugins/vllm[cpu]' (or [cuda] for NVIDIA GPUs)",
    "diffusers": "pip install -e plugins/diffusers",
}


def install_hint(engine: str) -> str:
    """What installs `engine`; a third-party engine's own distribution otherwise."""
    return INSTALL_HINTS.get(engine, f"install the plugin that provides the {engine!r} engine")
