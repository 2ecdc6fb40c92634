"""Small shared utilities (seeding)."""
from dualdiff.utils.seed import derive_seed, seed_everything, seed_worker

__all__ = ["seed_everything", "derive_seed", "seed_worker"]
