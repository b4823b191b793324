"""Training: the one training loop (engine), resume state, one student per seed, and the distiller that
builds the teacher side (live, cached outputs or views), the loss and the hint phase."""
