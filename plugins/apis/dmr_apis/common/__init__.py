"""What the dialects share: request bodies, errors, model names, runner calls, streams,
images and tool calls."""
