"""The runner worker: `python -m dmr_llamacpp.runner` serves one GGUF on a unix socket.

Only this package imports llama_cpp; the engine (in the server process) never does.
"""
