"""Fused ops: each module holds the plain-PyTorch reference (the specification), the
``torch.library`` custom op and the backend dispatch."""
