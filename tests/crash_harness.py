"""Real-fault crash harness: kill a training process with SIGKILL inside a checkpoint write or
inside a metrics write, resume it in a new process, and compare with an uninterrupted run.

Reusable for any command that trains with :class:`dualdiff.train.Trainer`::

    from crash_harness import Fault, cli_command, crash_and_resume, assert_same_final_state

    cmd = cli_command("tadiff", "train", "preset=tiny", "train.steps=6",
                      "train.checkpoint_every=2", "train.log_every=1")
    res = crash_and_resume(cmd, tmp_path)           # baseline + killed runs + final resume
    assert_same_final_state(res.baseline_dir, res.crash_dir)

``command(out_dir, resume)`` returns the child's ``python`` arguments (``-m module ...`` or
``script.py ...``); :func:`cli_command` builds it for ``dualdiff <exp> <cmd>`` (adding
``--out-dir`` and, on resume, ``--resume``). The child runs as
``python tests/crash_harness.py child <those arguments>`` with the fault in the environment
variable ``DUALDIFF_CRASH`` (``log:STEP`` or ``checkpoint:STEP:FRACTION``): before the
command starts, the child wraps ``torch.save`` and the metrics logger's ``open`` so that

* ``checkpoint:S:F`` -- while ``atomic_save`` writes the checkpoint of step S, the first
  fraction F of the real bytes go into the temporary file (flushed and fsync'ed), then the
  process sends itself SIGKILL;
* ``log:S`` -- while the record of step S is appended to ``metrics.jsonl``, the first half of
  its line is written and flushed, then SIGKILL.

The default scenario (:data:`DEFAULT_FAULTS`) needs ``checkpoint_every=2`` and
``log_every=1`` and at least 6 steps: the first process dies mid-log at step 3, the second
(resumed from step 2) dies mid-checkpoint at step 4, the third resumes from step 2 again
and finishes.

``python tests/crash_harness.py tiny --out-dir D [--resume] [steps=N]`` trains a tiny
MLP with every kind of state (AdamW, cosine LR, EMA, dropout and numpy/python RNG in the
loss) in about a second: the fast case of the tests.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
ENV_VAR = "DUALDIFF_CRASH"

Command = Callable[[Path, bool], list[str]]


@dataclasses.dataclass(frozen=True)
class Fault:
    """Where the child kills itself: ``where`` 'log' or 'checkpoint', at training ``step``;
    ``fraction``: the share of the checkpoint's bytes written before the kill."""
    where: str
    step: int
    fraction: float = 0.5

    def __post_init__(self):
        if self.where not in ("log", "checkpoint"):
            raise ValueError(f"Fault.where must be 'log' or 'checkpoint', got {self.where!r}")

    @property
    def spec(self) -> str:
        return f"{self.where}:{self.step}:{self.fraction}"


DEFAULT_FAULTS = (Fault("log", 3), Fault("checkpoint", 4, 0.5))


@dataclasses.dataclass
class CrashResult:
    baseline_dir: Path
    crash_dir: Path
    baseline: subprocess.CompletedProcess
    runs: list[subprocess.CompletedProcess]  # the killed ones, then the final resume

    @property
    def stderr(self) -> str:
        return "\n".join(r.stderr for r in self.runs)


def cli_command(*args: str) -> Command:
    """``dualdiff <args...> --out-dir D [--resume]`` as a :data:`Command`."""
    def command(out_dir: Path, resume: bool) -> list[str]:
        return ["-m", "dualdiff", *args, "--out-dir", str(out_dir)] + (["--resume"] if resume
                                                                       else [])
    return command


def tiny_command(steps: int = 6, *extra: str) -> Command:
    """The built-in tiny Trainer run (see the module docstring)."""
    def command(out_dir: Path, resume: bool) -> list[str]:
        return [str(HERE), "tiny", "--out-dir", str(out_dir), f"steps={steps}", *extra] + (
            ["--resume"] if resume else [])
    return command


def _env(fault: Fault | None) -> dict:
    env = dict(os.environ)
    env.pop(ENV_VAR, None)
    if fault is not None:
        env[ENV_VAR] = fault.spec
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]]
                                                        if env.get("PYTHONPATH") else []))
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    env["PYTHONWARNINGS"] = "default"  # every warning shows, once per place
    return env


def run_child(command: Command, out_dir: Path, *, resume: bool = False,
              fault: Fault | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``command`` in a fresh Python process with ``fault`` armed."""
    argv = [sys.executable, str(HERE), "child", *command(Path(out_dir), resume)]
    return subprocess.run(argv, env=_env(fault), cwd=str(REPO), capture_output=True,
                          text=True, timeout=timeout)


def _describe(proc: subprocess.CompletedProcess) -> str:
    return (f"exit status {proc.returncode} of {' '.join(proc.args[2:])}\n--- stdout\n"
            f"{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}")


def crash_and_resume(command: Command, tmp_path: Path,
                     faults: Sequence[Fault] = DEFAULT_FAULTS,
                     timeout: float = 600) -> CrashResult:
    """An uninterrupted run in ``tmp_path/baseline`` (concurrently) and, in
    ``tmp_path/crash``, one process per fault, each killed by SIGKILL at its fault (the first
    one fresh, the others resumed), then a final resumed process that must finish.

    Checks as it goes that every faulted process really died of SIGKILL, that a checkpoint
    fault left its partial ``.tmp`` file and a log fault a torn last line, and that the final
    process succeeded, removed the ``.tmp`` files and warned about both."""
    base, crash = Path(tmp_path) / "baseline", Path(tmp_path) / "crash"
    with ThreadPoolExecutor(1) as pool:
        baseline = pool.submit(run_child, command, base, timeout=timeout)
        runs = []
        for i, fault in enumerate(faults):
            proc = run_child(command, crash, resume=i > 0, fault=fault, timeout=timeout)
            runs.append(proc)
            assert proc.returncode == -signal.SIGKILL, (
                f"fault {fault.spec} did not kill the run:\n{_describe(proc)}")
            if fault.where == "checkpoint":
                tmps = list(crash.rglob("checkpoints/.*.tmp"))
                assert tmps, f"the kill at {fault.spec} left no partial .tmp file"
            else:
                torn = [p for p in crash.rglob("metrics.jsonl")
                        if not p.read_bytes().endswith(b"\n")]
                assert torn, f"the kill at {fault.spec} left no torn metrics.jsonl line"
        final = run_child(command, crash, resume=True, timeout=timeout)
        runs.append(final)
        baseline = baseline.result()
    assert baseline.returncode == 0, f"the uninterrupted run failed:\n{_describe(baseline)}"
    assert final.returncode == 0, f"the final resumed run failed:\n{_describe(final)}"
    leftovers = [str(p) for p in crash.rglob("*.tmp")]
    assert not leftovers, f"temporary files left after resuming: {leftovers}"
    result = CrashResult(base, crash, baseline, runs)
    err = result.stderr
    if any(f.where == "checkpoint" for f in faults):
        assert "partial checkpoint file(s) left by an interrupted write" in err, err[-4000:]
    if any(f.where == "log" for f in faults):
        assert "dropped a torn last line" in err, err[-4000:]
    return result


# --- comparison ---------------------------------------------------------------------------

def final_checkpoints(run_dir: Path) -> dict[str, Path]:
    """The newest ``step_*.pt`` of every ``checkpoints`` folder under ``run_dir``, keyed by
    the folder's path relative to ``run_dir``."""
    out: dict[str, Path] = {}
    for d in sorted(Path(run_dir).rglob("checkpoints")):
        files = sorted(d.glob("step_*.pt"))
        if files:
            out[str(d.relative_to(run_dir))] = files[-1]
    return out


def _diff(a, b, where: str, out: list[str]) -> None:
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            out.append(f"{where}: tensor vs {type(b).__name__}")
        elif a.dtype != b.dtype or a.shape != b.shape:
            out.append(f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}")
        elif not torch.equal(a, b) and not (a.is_floating_point()
                                            and torch.equal(a.isnan(), b.isnan())
                                            and torch.equal(a.nan_to_num(), b.nan_to_num())):
            d = (a.double() - b.double()).abs().max().item() if a.is_floating_point() else "-"
            out.append(f"{where}: values differ (max abs diff {d})")
    elif isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                out.append(f"{where}.{k}: only in {'baseline' if k in a else 'resumed'}")
            else:
                _diff(a[k], b[k], f"{where}.{k}", out)
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            out.append(f"{where}: length {len(a)} vs {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{where}[{i}]", out)
    elif a != b and not (isinstance(a, float) and isinstance(b, float) and a != a and b != b):
        out.append(f"{where}: {a!r} vs {b!r}")


TRAINING_STATE = ("step", "model", "optimizer", "ema", "scheduler", "scaler", "data", "counters")


def compare_final_state(baseline_dir: Path, crash_dir: Path,
                        keys: Sequence[str] = TRAINING_STATE) -> list[str]:
    """Differences between the final checkpoints of the two runs (empty: bitwise equal)."""
    import torch

    a, b = final_checkpoints(baseline_dir), final_checkpoints(crash_dir)
    if not a:
        return [f"no checkpoint under {baseline_dir}"]
    if sorted(a) != sorted(b) or [p.name for p in a.values()] != [p.name for p in b.values()]:
        return [f"final checkpoints differ: {[str(p) for p in a.values()]} vs "
                f"{[str(p) for p in b.values()]}"]
    out: list[str] = []
    for rel in a:
        sa = torch.load(a[rel], weights_only=True)
        sb = torch.load(b[rel], weights_only=True)
        for k in keys:
            _diff(sa.get(k), sb.get(k), f"{rel}/{a[rel].name}:{k}", out)
    return out


def metric_trajectory(run_dir: Path, fields: Sequence[str] = ("step", "loss")) -> dict:
    """``{relative metrics.jsonl path: [(field values) per record]}`` under ``run_dir``."""
    import json

    out = {}
    for p in sorted(Path(run_dir).rglob("metrics.jsonl")):
        recs = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        out[str(p.relative_to(run_dir))] = [tuple(r.get(f) for f in fields) for r in recs]
    return out


def assert_same_final_state(baseline_dir: Path, crash_dir: Path,
                            keys: Sequence[str] = TRAINING_STATE) -> None:
    """The final checkpoints hold bitwise-equal training state, and the metric files the
    same (step, loss) records."""
    diffs = compare_final_state(baseline_dir, crash_dir, keys)
    assert not diffs, "resumed run differs from the uninterrupted one:\n" + "\n".join(diffs[:30])
    ma, mb = metric_trajectory(baseline_dir), metric_trajectory(crash_dir)
    assert ma == mb, f"metrics differ:\nbaseline {ma}\nresumed  {mb}"


# --- child side ---------------------------------------------------------------------------

def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(spec: str) -> None:
    """Install the fault ``spec`` (see the module docstring) in this process."""
    where, step, fraction = spec.split(":")
    step, fraction = int(step), float(fraction)
    if where == "checkpoint":
        import io

        import torch

        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            if (isinstance(obj, dict) and obj.get("format") == "dualdiff.train.checkpoint"
                    and obj.get("step") == step and hasattr(f, "write")):
                buf = io.BytesIO()
                real_save(obj, buf, *args, **kwargs)
                data = buf.getvalue()
                f.write(data[: int(len(data) * fraction)])
                f.flush()
                os.fsync(f.fileno())
                _kill()
            return real_save(obj, f, *args, **kwargs)

        torch.save = save
    elif where == "log":
        import builtins
        import json

        from dualdiff.train import metrics_log

        class TornWriter:
            def __init__(self, f):
                self._f = f

            def write(self, s):
                try:
                    rec = json.loads(s)
                except ValueError:
                    rec = None
                if isinstance(rec, dict) and rec.get("step") == step:
                    self._f.write(s[: len(s) // 2])
                    self._f.flush()
                    os.fsync(self._f.fileno())
                    _kill()
                return self._f.write(s)

            def __getattr__(self, name):
                return getattr(self._f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self._f.__exit__(*exc)

        def torn_open(file, mode="r", *args, **kwargs):
            f = builtins.open(file, mode, *args, **kwargs)
            if str(file).endswith("metrics.jsonl") and "a" in mode:
                return TornWriter(f)
            return f

        metrics_log.open = torn_open
    else:
        raise ValueError(f"unknown fault {spec!r}")


def _child(argv: list[str]) -> None:
    import runpy

    spec = os.environ.get(ENV_VAR)
    if spec:
        _arm(spec)
    if argv and argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        runpy.run_path(argv[0], run_name="__main__")


def _tiny(argv: list[str]) -> None:
    """A tiny Trainer run holding every kind of resumable state."""
    import argparse
    import random

    import numpy as np
    import torch
    from torch import nn

    from dualdiff.train import TrainConfig, Trainer

    torch.set_num_threads(1)
    p = argparse.ArgumentParser()
    p.add_argument("--out-dir", required=True)
    p.add_argument("--resume", action="store_true")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    kw = dict(steps=6, batch_size=8, lr=1e-2, progress=False, checkpoint_every=2, log_every=1,
              keep_last=2, ema_decay=0.9, scheduler="cosine")
    for tok in args.overrides:
        k, _, v = tok.partition("=")
        kw[k] = type(kw[k])(v) if k in kw and kw[k] is not None else float(v) if "." in v \
            else int(v)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=g)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.SiLU(), nn.Dropout(0.2), nn.Linear(16, 1))

    def loss_fn(m, batch):
        noise = 0.01 * torch.randn(()) + 0.01 * float(np.random.rand()) + 0.01 * random.random()
        return ((m(batch[0]) - batch[1]) ** 2).mean() + noise

    tr = Trainer(model, loss_fn, data, TrainConfig(out_dir=args.out_dir,
                                                   resume="auto" if args.resume else None, **kw))
    tr.fit()
    tr.close()


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("child", "tiny"):
        sys.exit("usage: crash_harness.py child (-m MODULE | SCRIPT) ARGS... | "
                 "tiny --out-dir D [--resume] [key=value ...]")
    (_child if sys.argv[1] == "child" else _tiny)(sys.argv[2:])
