"""What the dialects share: request bodies, errors, model names, streams,
images and tool calls."""
