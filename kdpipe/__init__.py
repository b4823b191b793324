"""kdpipe: a reproducible knowledge-distillation pipeline."""
