"""`alignkit export`: a run as a plain model (transformers dir or .gguf) with its adapter merged in."""
