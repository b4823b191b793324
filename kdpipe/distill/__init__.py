"""Distillation methods: the loss terms (pure functions of tensors), the torch-free catalogue of their names
that params are checked against, CRD's memory bank, the curriculum and cached teacher views."""
