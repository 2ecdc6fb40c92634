"""Fused ops: each module holds the plain-PyTorch reference (the specification), the
``torch.library`` custom op and the backend dispatch."""
from dualdiff.ops.timestep_embedding import (DualTimestepEmbedding, DualTimestepEmbeddingReference,
                                             dual_timestep_embedding,
                                             dual_timestep_embedding_reference,
                                             sinusoidal_embedding, timestep_frequencies)

__all__ = [
    "DualTimestepEmbedding", "DualTimestepEmbeddingReference", "dual_timestep_embedding",
    "dual_timestep_embedding_reference", "sinusoidal_embedding", "timestep_frequencies",
]
