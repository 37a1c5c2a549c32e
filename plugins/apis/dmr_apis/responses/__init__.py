"""The OpenAI Responses dialect (its routes and hook: `dmr_apis.responses.routes`)."""
