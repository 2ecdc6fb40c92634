"""DDP under torchrun: 2 CPU processes (gloo) end with the same weights as one process on
the combined batch (with gradient accumulation, so no_sync is exercised), and a NaN on one
rank makes every rank skip the step."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

WORKER = textwrap.dedent('''
    import math, sys
    import torch
    from torch import nn
    import torch.distributed as dist
    from dualdiff.train import TrainConfig, Trainer, cleanup_distributed, get_rank, get_world_size

    def make(seed=0):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))

    def dataset():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 4, generator=g)
        return torch.utils.data.TensorDataset(x, torch.tanh(x.sum(1, keepdim=True)))

    def mse(model, batch):
        return ((model(batch[0]) - batch[1]) ** 2).mean()

    def run(out, batch_size, loss_fn=mse, steps=6, model_seed=None):
        # every rank but 0 starts from different weights: DDP must broadcast rank 0's
        seed = get_rank() if model_seed is None else model_seed
        cfg = TrainConfig(steps=steps, batch_size=batch_size, grad_accum=2, lr=1e-2,
                          optimizer="adamw", scheduler="onecycle", grad_clip=0.5,
                          ema_decay=0.5, out_dir=out, progress=False, checkpoint_every=3)
        tr = Trainer(make(seed), loss_fn, dataset(), cfg)
        tr.fit()
        return tr

    if __name__ == "__main__":
        out = sys.argv[1]
        tr = run(out + "/main", batch_size=4)
        assert get_world_size() == 2 and tr.world_size == 2
        torch.save({"model": tr.model.state_dict(), "ema": tr.ema_model.state_dict(),
                    "losses": [r["loss"] for r in tr.history]}, f"{out}/rank{get_rank()}.pt")
        calls = [0]
        def nan_on_rank1(model, batch):
            calls[0] += 1
            loss = mse(model, batch)
            if get_rank() == 1 and calls[0] == 5:   # step 3, first micro-batch, rank 1 only
                loss = loss * float("nan")
            return loss
        tr = run(out + "/nan", batch_size=4, loss_fn=nan_on_rank1, steps=4, model_seed=0)
        torch.save({"model": tr.model.state_dict(), "nonfinite": tr.nonfinite_total,
                    "skipped": [r["step"] for r in tr.history if r["skipped"]]},
                   f"{out}/nan_rank{get_rank()}.pt")
        del tr  # its DDP wrapper holds the process group: free it before the group goes
        cleanup_distributed()
''')


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="needs torch.distributed with gloo")
def test_ddp_two_cpu_ranks_match_single_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1])
               + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), k  # ranks in lock step
    assert r0["losses"] == r1["losses"]  # the logged loss is the all-reduced mean

    # one process on the combined batch (2 ranks x 4 samples = 8 per micro-batch)
    sys.path.insert(0, str(tmp_path))
    try:
        import importlib
        worker = importlib.import_module("worker")
        single = worker.run(str(tmp_path / "single"), batch_size=8, model_seed=0)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("worker", None)
    assert single.world_size == 1
    for k, v in single.model.state_dict().items():
        torch.testing.assert_close(r0["model"][k], v, rtol=1e-5, atol=1e-6)
    for k, v in single.ema_model.state_dict().items():
        torch.testing.assert_close(r0["ema"][k], v, rtol=1e-5, atol=1e-6)
    assert r0["losses"] == pytest.approx([r["loss"] for r in single.history], rel=1e-5)
    # rank 0 wrote checkpoints holding both ranks' RNG states
    ck = torch.load(tmp_path / "main/checkpoints/step_00000006.pt", weights_only=True)
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2
    assert not torch.equal(ck["rng"][0]["torch"], ck["rng"][1]["torch"])

    # a NaN on rank 1 only: both ranks skip step 3 and stay identical
    n0 = torch.load(tmp_path / "nan_rank0.pt", weights_only=True)
    n1 = torch.load(tmp_path / "nan_rank1.pt", weights_only=True)
    assert n0["nonfinite"] == n1["nonfinite"] == 1
    assert n0["skipped"] == [3]
    for k in n0["model"]:
        assert torch.equal(n0["model"][k], n1["model"][k])
        assert torch.isfinite(n0["model"][k]).all()
