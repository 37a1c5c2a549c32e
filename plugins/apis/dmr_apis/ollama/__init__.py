"""The Ollama dialect (its routes and hooks: `dmr_apis.ollama.routes`)."""
