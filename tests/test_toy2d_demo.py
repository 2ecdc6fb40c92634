"""``dualdiff toy2d demo``: the grid end to end, then one figure (demo.png) and a report (demo.md)
whose numbers are the run's own (read back from all_results.json), and the one-seed caveat."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from dualdiff.cli import main
from dualdiff.experiments.toy2d import (TOY2D_PRESETS, Toy2DConfig, demo_report, load_datasets,
                                        load_results)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# seconds: 2 variants x 2 datasets, 4 steps on 64 points, 32 samples per run
TINY = ["preset=tiny", "train.steps=4", "data.n_train=64", "train.batch_size=16", "n_samples=32",
        "datasets=circle,dino", "variants=baseline,adaptive"]
MINUS = "\u2212"


def _signed(x: float) -> str:
    return f"{x:+.2f}".replace("-", MINUS)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One tiny demo through the CLI, capturing demo.png's figure before it is saved."""
    import dualdiff.analysis.toy2d_plots as plots

    out = tmp_path_factory.mktemp("toy2d-demo") / "run"
    figures = []
    real_save = plots.save_figure

    def capture(fig, path, **kw):
        if Path(path).name == "demo.png":
            figures.append({"suptitle": fig._suptitle.get_text() if fig._suptitle else "",
                            "texts": [t.get_text() for t in fig.texts],
                            "titles": [ax.get_title() for ax in fig.axes]})
        return real_save(fig, path, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(plots, "save_figure", capture)
    try:
        import torch
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        rc = main(["toy2d", "demo", "--out-dir", str(out), *TINY])
        torch.set_num_threads(n)
    finally:
        mp.undo()
    assert rc == 0
    assert len(figures) == 1
    return out, figures[0]


def test_demo_writes_the_usual_outputs_and_one_figure_and_report(demo_run):
    out, _ = demo_run
    for name in ("all_results.json", "all_results.npz", "generated_images.png", "demo.png", "demo.md",
                 "baseline/dino/final_info.json", "adaptive/circle/samples.npy"):
        assert (out / name).is_file(), name
    with Image.open(out / "demo.png") as im:
        w, h = im.size
    assert 600 <= w <= 1600 and h >= 300, (w, h)


def test_the_figure_carries_the_runs_kl_from_the_results_file(demo_run):
    out, fig = demo_run
    res = json.loads((out / "all_results.json").read_text())
    kl = {name: info["kl_divergence"] for name, info in res["runs"].items()}
    assert set(kl) == {"baseline/circle", "baseline/dino", "adaptive/circle", "adaptive/dino"}
    # the headline: adaptive - baseline on dino, and the other dataset beside it
    want = f"adaptive vs baseline KL: {_signed(kl['adaptive/dino'] - kl['baseline/dino'])} on dino"
    assert fig["suptitle"].startswith(want), fig["suptitle"]
    assert f"circle {_signed(kl['adaptive/circle'] - kl['baseline/circle'])}" in fig["suptitle"]
    # every run's panel shows its KL; the data panels head each row
    for name, value in kl.items():
        v = name.split("/")[0]
        assert f"{v}  KL {value:.2f}" in fig["titles"], (name, fig["titles"])
    assert sum(t.endswith("pts)") and ": data" in t for t in fig["titles"]) == 2
    assert len(fig["titles"]) == 2 * 3  # 2 datasets x (data + 2 variants)
    assert any("within noise" in t and "dualdiff toy2d study" in t for t in fig["texts"])


def test_the_report_states_the_one_seed_caveat_and_the_numbers(demo_run):
    out, fig = demo_run
    md = (out / "demo.md").read_text()
    assert "with one seed every difference between variants is within noise" in md.lower()
    assert "`dualdiff toy2d study`" in md
    assert fig["suptitle"] in md
    res = json.loads((out / "all_results.json").read_text())
    for d in ("circle", "dino"):
        b, a = res["runs"][f"baseline/{d}"]["kl_divergence"], res["runs"][f"adaptive/{d}"]["kl_divergence"]
        assert f"| {d} | {b:.2f} | {a:.2f} | {_signed(a - b)} |" in md
    assert "![demo](demo.png)" in md


def test_the_report_follows_the_results_file(demo_run, tmp_path):
    """Change the saved KL: the headline changes with it (nothing is computed elsewhere)."""
    out, _ = demo_run
    results = load_results(out)
    before = demo_report(results)["headline"]
    results["runs"]["adaptive/dino"] = {**results["runs"]["adaptive/dino"],
                                       "kl_divergence": results["runs"]["baseline/dino"]["kl_divergence"] - 1.234}
    after = demo_report(results)
    assert after["headline"].startswith(f"adaptive vs baseline KL: {MINUS}1.23 on dino"), after["headline"]
    assert after["headline"] != before
    assert after["differences"]["kl"]["dino"] == pytest.approx(-1.234)
    # a KL that could not be estimated is written as nan, not as a number
    results["runs"]["baseline/circle"] = {**results["runs"]["baseline/circle"], "kl_divergence": None}
    assert "circle nan" in demo_report(results)["headline"]


def test_one_variant_headline_and_no_dino(demo_run):
    out, _ = demo_run
    results = load_results(out)
    results["variants"] = ["baseline"]
    results["datasets"] = ["circle"]
    rep = demo_report(results)
    kl = results["runs"]["baseline/circle"]["kl_divergence"]
    assert rep["headline"] == f"baseline KL on circle: {kl:.2f}"
    assert math.isfinite(kl)


def test_demo_preset_is_the_documented_size():
    cfg = Toy2DConfig.from_name("demo")
    assert cfg == TOY2D_PRESETS["demo"]() and cfg.train.out_dir == "runs/toy2d-demo"
    assert (cfg.train.steps, cfg.train.batch_size, cfg.data.n_train, cfg.n_samples) == (2000, 256, 10_000, 2000)
    assert len(cfg.variants) == 4 and len(cfg.datasets) == 4
    assert load_datasets(cfg, ["dino"])["dino"].shape == (10_000, 2)


@pytest.mark.parametrize("argv, text", [
    (["preset=nope"], "unknown preset 'nope'"),
    (["nope=1"], "nope"),
    (["train.steps=0"], "steps must be > 0"),
])
def test_user_errors_are_one_line(argv, text, tmp_path, capsys):
    capsys.readouterr()
    assert main(["toy2d", "demo", "--out-dir", str(tmp_path / "r"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dualdiff: error:") and text in err[0], err
    assert not (tmp_path / "r" / "demo.png").exists()
