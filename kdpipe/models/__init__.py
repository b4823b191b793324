"""Models: the networks, the name → model table (torchvision included), and checkpoints that carry their params."""
