"""Shipping: ONNX export and its checks, the typed export results, registering versions through the
candidate/champion gate, and reading the registry back."""
