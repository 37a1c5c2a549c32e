"""OpenAI's Files and Batch APIs, run at batch priority (docs/batch.md)."""
