"""One training loop for every dualdiff experiment.

    from dualdiff.train import TrainConfig, Trainer
    trainer = Trainer(model, loss_fn, dataset, TrainConfig(steps=1000, lr=2e-4, ema_decay=0.999))
    trainer.fit()
    sample_with(trainer.ema_model)

See :mod:`dualdiff.train.loop` for the data contract and the loop's behaviour.
"""
from dualdiff.train.checkpoint import (CheckpointError, atomic_save, latest_checkpoint,
                                       list_checkpoints, load_checkpoint, save_checkpoint)
from dualdiff.train.distributed import (cleanup_distributed, get_rank, get_world_size,
                                        init_distributed, is_main_process)
from dualdiff.train.ema import EMA, unwrap_model
from dualdiff.train.loop import (NonFiniteLossError, ResumableBatchSampler, TrainConfig, Trainer,
                                 build_optimizer, build_scheduler, resolve_amp, train)
from dualdiff.train.metrics_log import MetricsLogger, read_jsonl

__all__ = [
    "TrainConfig", "Trainer", "train", "NonFiniteLossError", "ResumableBatchSampler",
    "build_optimizer", "build_scheduler", "resolve_amp",
    "EMA", "unwrap_model",
    "CheckpointError", "atomic_save", "save_checkpoint", "load_checkpoint", "latest_checkpoint",
    "list_checkpoints",
    "MetricsLogger", "read_jsonl",
    "init_distributed", "cleanup_distributed", "get_rank", "get_world_size", "is_main_process",
]
