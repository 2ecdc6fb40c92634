"""`dualdiff ldm ...`: user mistakes are one `dualdiff: error:` line (exit 2); the pipeline runs
end to end on a micro configuration."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dualdiff.cli import main

COMMON = ["preset=tiny", "data.image_size=16", "data.num_train=32", "data.num_test=8", "ae.base_channels=8",
          "model.dim=8", "model.attn_heads=1", "model.attn_dim_head=4", "sampling_timesteps=3",
          "eval_requests=2", "eval_samples=2", "num_samples=2", "eval_loss_batches=1", "eval_cond_scales=[1,3]"]
# each training stage takes its own TrainConfig's keys: the autoencoder ae.train.*, the UNet train.*
AE_MICRO = [*COMMON, "ae.train.steps=4", "ae.train.batch_size=8"]
MICRO = [*COMMON, "train.steps=4", "train.batch_size=8", "train.log_every=2"]
ENCODE_MICRO = [*COMMON, "train.batch_size=8"]  # encode reads no other train.* key


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dualdiff: error:"), err
    return err[0]


@pytest.mark.parametrize("cmd", ["autoencoder", "encode", "train", "sample", "eval", "plot", "demo", "study"])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main(["ldm", cmd, "--help"])
    assert e.value.code == 0 and "usage:" in capsys.readouterr().out


def _folder(root, size=16):
    rng = np.random.default_rng(0)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / "images" / f"a{i}.png")
        Image.fromarray(rng.integers(0, 5, (size, size), dtype=np.uint8)).save(root / "masks" / f"a{i}.png")
    return root


def test_user_mistakes(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert "unknown objective 'pred_eps'" in _error(capsys, ["ldm", "train", "--out-dir", out, "objective=pred_eps"])
    assert "run `dualdiff ldm encode` first" in _error(capsys, ["ldm", "train", "--out-dir", out, *MICRO])
    assert "model.channels (3) must equal ae.latent_channels" in _error(
        capsys, ["ldm", "train", "--out-dir", out, "model.channels=3"])
    assert "no checkpoint" in _error(capsys, ["ldm", "sample", "--out-dir", out])
    data = _folder(tmp_path / "data")
    argv = ["ldm", "encode", "--out-dir", out, *ENCODE_MICRO, "data.source=folder", f"data.path={data}"]
    Image.fromarray(np.full((16, 16), 5, np.uint8)).save(data / "masks" / "a1.png")
    assert "they must be in [0, 4]" in _error(capsys, argv)
    Image.fromarray(np.zeros((16, 12), np.uint8)).save(data / "masks" / "a1.png")
    assert f"bad mask {str(data / 'masks' / 'a1.png')!r}: is 12x16 but its image" in _error(capsys, argv)
    (data / "masks" / "a1.png").unlink()
    assert f"missing mask file for image {str(data / 'images' / 'a1.png')!r}" in _error(capsys, argv)
    _folder(data)
    assert "no autoencoder at" in _error(capsys, argv)
    assert "ae.path: no such folder" in _error(capsys, argv + ["ae.source=diffusers", f"ae.path={tmp_path / 'none'}"])


@pytest.mark.slow
def test_pipeline_end_to_end(tmp_path, capsys):
    out = str(tmp_path / "run")
    for cmd in ("autoencoder", "encode", "train"):
        micro = {"autoencoder": AE_MICRO, "encode": ENCODE_MICRO}.get(cmd, MICRO)
        assert main(["ldm", cmd, "--out-dir", out, *micro]) == 0, cmd
    assert main(["ldm", "sample", "--out-dir", out, "cond_scale=6"]) == 0
    assert main(["ldm", "eval", "--out-dir", out]) == 0
    assert main(["ldm", "plot", "--out-dir", out]) == 0
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert len(ev["cond_error"]) == 4 and all(0 <= r["cond_error"] <= 1 for r in ev["cond_error"])
    assert set(ev["loss_per_t_quartile"]) == {"pred_noise", "pred_x0", "pred_v"}
    assert np.isfinite(ev["frechet_ae_features"])
    s = torch.load(tmp_path / "run" / "samples" / "samples.pt", weights_only=True)
    assert s["images"].shape == (4, 3, 16, 16)
    for f in ("training.png", "loss_quartiles.png", "cond_error.png", "samples/grid.png", "eval_grids/cond_scale_3.png"):
        assert (tmp_path / "run" / f).is_file(), f


def test_study_user_mistakes(tmp_path, capsys):
    out = str(tmp_path / "s")
    assert "cond_scales must include 1" in _error(capsys, ["ldm", "study", "--out-dir", out, "cond_scales=[3,6]"])
    assert "no mismatch" in _error(capsys, ["ldm", "study", "--out-dir", out, "test_balance_p=0.5"])


@pytest.mark.parametrize("key", ["train.lr=1e-3", "train.steps=5", "ae.train.lr=1e-3"])
def test_encode_rejects_keys_it_does_not_read(key, capsys):
    """`ldm encode` reads only train.out_dir / batch_size / device: any other train.* (or the
    autoencoder's ae.train.*) key is one error line, never accepted and ignored."""
    from dualdiff.cli import main

    assert main(["ldm", "encode", "--out-dir", "runs/never-made", key, "--show-config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dualdiff: error:") and key.split("=")[0] in err[0]
    with pytest.raises(SystemExit) as done:  # --show-config prints and exits 0
        main(["ldm", "encode", "--out-dir", "runs/never-made", "train.batch_size=4", "--show-config"])
    assert done.value.code in (0, None) and "train.batch_size: int = " in capsys.readouterr().out


@pytest.mark.parametrize("override, refused", [
    ("objective=pred_noise", "objective"),              # how the network's output is read
    ("timesteps=500", "timesteps"),
    ("loss_weighting=min_snr", "loss_weighting"),       # training only: would be ignored
    ("cond_drop_prob=0.1", "cond_drop_prob"),
    ("data.test_fraction=0.5", "data.test_fraction"),   # another test split
    ("ae.kl_weight=1e-3", "ae.kl_weight"),              # the autoencoder that made the latents
    ("train.lr=1e-3", "train.lr"),
])
def test_sample_and_eval_refuse_keys_that_made_the_run(override, refused, monkeypatch, tmp_path):
    """`ldm sample` / `eval` take sampling and evaluation keys (and where things are now); a key
    that made the run, or acts only in training, is one ConfigError naming it, never ignored."""
    import dualdiff.experiments.ldm as ldm
    from dualdiff.errors import ConfigError

    stored = ldm.LDMConfig.from_name("tiny")
    monkeypatch.setattr(ldm, "load_ldm", lambda out, **kw: (torch.nn.Linear(1, 1), stored))
    _, cfg = ldm._load_run(tmp_path, ["cond_scale=3", "eval_samples=2", "train.seed=5",
                                      f"data.path={tmp_path}"], None)
    assert (cfg.cond_scale, cfg.eval_samples, cfg.train.seed) == (3.0, 2, 5)
    with pytest.raises(ConfigError, match=rf"{refused} cannot change"):
        ldm._load_run(tmp_path, [override], None)
    with pytest.raises(ConfigError, match=rf"{refused} cannot change"):
        ldm.sample_ldm(tmp_path, [override])
