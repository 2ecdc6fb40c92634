"""Fused ops: each module holds the plain-PyTorch reference (the specification), the
``torch.library`` custom op and the backend dispatch."""
from dualdiff.ops.vae import gaussian_kl, gaussian_kl_reference, vae_loss, vae_loss_reference
from dualdiff.ops.weighted_dice import weighted_dice_loss, weighted_dice_loss_reference
from dualdiff.ops.frechet import frechet_distance, frechet_distance_reference, trace_sqrt_product
from dualdiff.ops.hutchinson import hutchinson_vhv, hutchinson_vhv_reference, rademacher_probes
from dualdiff.ops.timestep_embedding import (DualTimestepEmbedding, DualTimestepEmbeddingReference,
                                             dual_timestep_embedding,
                                             dual_timestep_embedding_reference,
                                             sinusoidal_embedding, timestep_frequencies)

__all__ = [
    "weighted_dice_loss", "weighted_dice_loss_reference",
    "vae_loss", "vae_loss_reference", "gaussian_kl", "gaussian_kl_reference",
    "hutchinson_vhv", "hutchinson_vhv_reference", "rademacher_probes",
    "frechet_distance", "frechet_distance_reference", "trace_sqrt_product",
    "DualTimestepEmbedding", "DualTimestepEmbeddingReference", "dual_timestep_embedding",
    "dual_timestep_embedding_reference", "sinusoidal_embedding", "timestep_frequencies",
]
