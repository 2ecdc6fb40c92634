"""`dualdiff tadiff ...`: user mistakes are one `dualdiff: error:` line (exit 2); the commands
run end to end on a micro configuration."""
import numpy as np
import pytest

from dualdiff.cli import main
from dualdiff.data.tadiff import write_procedural_patients

MICRO = ["preset=tiny", "model.image_size=16", "model.base_channels=8", "model.channel_mult=[1,2]",
         "model.num_res_blocks=1", "model.attention_ds=[]", "model.num_heads=1", "model.norm_groups=4",
         "data.num_patients=3", "data.val_patients=1", "data.depth=4", "train.steps=3",
         "train.batch_size=4", "eval_batches=1", "eval_t_points=2", "sample_cases=2", "num_samples=2",
         "sample_steps=2"]


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dualdiff: error:"), err
    return err[0]


@pytest.mark.parametrize("cmd", ["make-data", "train", "sweep", "eval", "plot", "demo"])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main(["tadiff", cmd, "--help"])
    assert e.value.code == 0 and "usage:" in capsys.readouterr().out


def test_config_mistakes(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert "unknown λ schedule 'linear'" in _error(capsys, ["tadiff", "train", "--out-dir", out, "schedule=linear"])
    assert "unknown λ schedule 'nope'" in _error(capsys, ["tadiff", "sweep", "--out-dir", out, "schedules=fixed,nope"])
    assert "k must be >= 0" in _error(capsys, ["tadiff", "train", "--out-dir", out, "k=-0.5"])
    assert "lambda_combine" in _error(capsys, ["tadiff", "train", "--out-dir", out, "lambda_combine=mean"])
    assert "data.path is required" in _error(capsys, ["tadiff", "train", "--out-dir", out, "data.source=npy"])
    assert "does not exist" in _error(capsys, ["tadiff", "eval", "--checkpoint", str(tmp_path / "none.pt")])
    assert "no eval.json" in _error(capsys, ["tadiff", "plot", "--run-dir", str(tmp_path)])


def test_data_mistakes(tmp_path, capsys):
    data = tmp_path / "data"
    write_procedural_patients(data, 3, size=16, depth=4, sessions=5)
    argv = ["tadiff", "train", "--out-dir", str(tmp_path / "run"), *MICRO, "data.source=npy", f"data.path={data}"]
    (data / "sub-001_treatment.npy").unlink()
    assert "missing treatment file of patient sub-001" in _error(capsys, argv)
    write_procedural_patients(data, 3, size=16, depth=4, sessions=5)
    np.save(data / "sub-002_image.npy", np.zeros((2 * 5, 16, 16, 4), np.float32))
    assert "2 modalities per session" in _error(capsys, argv)
    (tmp_path / "empty").mkdir()
    assert "at least 2 are needed" in _error(capsys, ["tadiff", "train", "--out-dir", str(tmp_path / "r"), *MICRO,
                                                      "data.source=npy", f"data.path={tmp_path / 'empty'}"])
    assert "is not a directory" in _error(capsys, ["tadiff", "train", "--out-dir", str(tmp_path / "r"), *MICRO,
                                                   "data.source=nifti", f"data.path={tmp_path / 'none'}"])


@pytest.mark.slow
def test_make_data_sweep_eval_plot(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["tadiff", "make-data", "--out-dir", str(data), *MICRO]) == 0
    assert sorted(p.name for p in data.glob("*_days.npy")) == ["sub-000_days.npy", "sub-001_days.npy", "sub-002_days.npy"]
    sweep = tmp_path / "sweep"
    common = [*MICRO, "data.source=npy", f"data.path={data}"]
    assert main(["tadiff", "sweep", "--out-dir", str(sweep), *common, "schedules=fixed,learnable"]) == 0
    table = (sweep / "comparison.md").read_text()
    assert "| fixed |" in table and "| learnable |" in table
    for f in ("lambda_schedules.png", "loss_curves.png", "dice_vs_t.png", "samples_fixed.png", "samples_learnable.png"):
        assert (sweep / f).stat().st_size > 1000, f
    # eval on the stored config with an override, into a new folder; the model keys cannot change
    assert main(["tadiff", "eval", "--checkpoint", str(sweep / "fixed"), "--out-dir", str(tmp_path / "ev"),
                 "num_samples=1"]) == 0
    assert (tmp_path / "ev" / "eval.json").is_file()
    assert "cannot change" in _error(capsys, ["tadiff", "eval", "--checkpoint", str(sweep / "fixed"),
                                              "model.base_channels=16"])
    # nor the keys that choose the validation patients (another split could score training ones)
    assert "data.val_patients cannot change" in _error(
        capsys, ["tadiff", "eval", "--checkpoint", str(sweep / "fixed"), "data.val_patients=2"])
    # nor the noise schedule or loss the model was trained with, nor a key eval would ignore
    for key in ("beta_end=0.01", "lambda0=0.1", "schedules=[fixed]", "train.lr=1e-3"):
        assert f"{key.split('=')[0]} cannot change" in _error(
            capsys, ["tadiff", "eval", "--checkpoint", str(sweep / "fixed"), key]), key
    # a finished sweep resumes without retraining
    assert main(["tadiff", "sweep", "--out-dir", str(sweep), *common, "schedules=fixed,learnable", "--resume"]) == 0
    assert "already trained" in capsys.readouterr().out
    assert main(["tadiff", "plot", "--run-dir", str(sweep / "fixed")]) == 0
