"""The Anthropic Messages dialect (its routes and hook: `dmr_apis.anthropic.routes`)."""
