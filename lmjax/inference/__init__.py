"""Using trained models: text generation with a KV cache, and fill-mask."""
