"""One training loop for every dualdiff experiment.

    from dualdiff.train import TrainConfig, Trainer
    trainer = Trainer(model, loss_fn, dataset, TrainConfig(steps=1000, lr=2e-4, ema_decay=0.999))
    trainer.fit()
    sample_with(trainer.ema_model)

One job per module: :mod:`~dualdiff.train.config` (TrainConfig), :mod:`~dualdiff.train.optim`
(optimizer / LR schedule / AMP), :mod:`~dualdiff.train.data` (batch sources, the data
contract), :mod:`~dualdiff.train.state` (RNG state, config snapshots),
:mod:`~dualdiff.train.trainer` (the loop's behaviour), plus checkpoint, ema, metrics_log and
distributed.
"""
from dualdiff.train.checkpoint import (CheckpointError, atomic_save, find_resumable,
                                       latest_checkpoint, list_checkpoints, load_checkpoint,
                                       remove_stale_tmp, resolve_checkpoint, save_checkpoint)
from dualdiff.train.config import NonFiniteLossError, TrainConfig
from dualdiff.train.data import ResumableBatchSampler
from dualdiff.train.distributed import (cleanup_distributed, get_rank, get_world_size,
                                        init_distributed, is_main_process)
from dualdiff.train.ema import EMA, unwrap_model
from dualdiff.train.metrics_log import MetricsLogger, read_jsonl
from dualdiff.train.optim import build_optimizer, build_scheduler, resolve_amp
from dualdiff.train.trainer import Trainer, train

__all__ = [
    "TrainConfig", "Trainer", "train", "NonFiniteLossError", "ResumableBatchSampler",
    "build_optimizer", "build_scheduler", "resolve_amp",
    "EMA", "unwrap_model",
    "CheckpointError", "atomic_save", "save_checkpoint", "load_checkpoint", "latest_checkpoint",
    "list_checkpoints", "resolve_checkpoint", "find_resumable", "remove_stale_tmp",
    "MetricsLogger", "read_jsonl",
    "init_distributed", "cleanup_distributed", "get_rank", "get_world_size", "is_main_process",
]
