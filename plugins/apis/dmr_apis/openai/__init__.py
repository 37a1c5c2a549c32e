"""The OpenAI dialect (its routes and hook: `dmr_apis.openai.routes`)."""
