"""dualdiff.config: YAML loading, key=value overrides, errors, YAML dump round trip."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import pytest

from dualdiff.config import (ConfigError, apply_overrides, dump_yaml, from_dict, load_config,
                             parse_cli, to_dict, valid_keys)
from dualdiff.train import TrainConfig


@dataclass
class Model:
    width: int = 64
    act: Literal["relu", "silu"] = "silu"
    dropout: Optional[float] = None


@dataclass
class Exp:
    name: str = "run"
    loss_multiplier_kl: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    tags: list[str] = field(default_factory=list)
    use_ema: bool = True
    checkpoint: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)
    model: Model = field(default_factory=Model)
    train: TrainConfig = field(default_factory=TrainConfig)


PRESETS = {"test_run": {"name": "test", "train": {"steps": 10, "batch_size": 4}}}


def test_cli_preset_and_overrides_convert_types():
    cfg = parse_cli(Exp, ["test_run", "loss_multiplier_kl=0.0001", "train.lr=1e-4",
                          "train.amp=bf16", "use_ema=false", "model.width=32",
                          "betas=[0.5, 0.6]", "tags=a,b", "checkpoint=none",
                          "train.grad_clip=1", "model.dropout=0.1"], PRESETS)
    assert cfg.name == "test" and cfg.train.steps == 10 and cfg.train.batch_size == 4
    assert cfg.loss_multiplier_kl == pytest.approx(1e-4) and isinstance(cfg.loss_multiplier_kl, float)
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.train.amp == "bf16"
    assert cfg.use_ema is False
    assert cfg.model.width == 32 and isinstance(cfg.model.width, int)
    assert cfg.betas == (0.5, 0.6)
    assert cfg.tags == ["a", "b"]
    assert cfg.checkpoint is None
    assert cfg.train.grad_clip == 1.0 and isinstance(cfg.train.grad_clip, float)
    assert cfg.model.dropout == pytest.approx(0.1)
    # defaults untouched elsewhere
    assert cfg.train.optimizer == "adamw"


def test_dict_field_whole_and_by_subkey():
    cfg = apply_overrides(Exp(), ["train.optimizer_kwargs={betas: [0.9, 0.99]}",
                                  "train.optimizer_kwargs.eps=1e-6", "extra.a.b=3"])
    assert cfg.train.optimizer_kwargs == {"betas": [0.9, 0.99], "eps": 1e-6}
    assert cfg.extra == {"a": {"b": 3}}


def test_unknown_key_lists_valid_keys_and_suggests():
    with pytest.raises(ConfigError) as e:
        apply_overrides(Exp(), ["train.lrr=1"])
    msg = str(e.value)
    assert "train.lrr" in msg and "Did you mean 'train.lr'" in msg and "train.steps" in msg
    with pytest.raises(ConfigError, match="loss_multiplier_kl"):
        parse_cli(Exp, ["loss_multiplier_k=0.1"])
    with pytest.raises(ConfigError, match="unknown config key 'modle'"):
        from_dict(Exp, {"modle": {"width": 3}})
    with pytest.raises(ConfigError, match="model.widht"):
        from_dict(Exp, {"model": {"widht": 3}})


@pytest.mark.parametrize("override, needle", [
    ("train.steps=abc", "'train.steps': expected int"),
    ("train.steps=1.5", "'train.steps': expected int"),
    ("train.lr=fast", "'train.lr': expected float"),
    ("use_ema=maybe", "'use_ema': expected bool"),
    ("train.amp=fp8", "one of 'auto', 'bf16', 'fp16', 'off'"),
    ("betas=[1, 2, 3]", "exactly 2 items"),
    ("train.steps=0", "steps must be > 0"),
    ("name.sub=1", "'name' is a str, it has no sub-key"),
    ("noequals", "key=value"),
])
def test_bad_values_name_key_and_type(override, needle):
    with pytest.raises(ConfigError) as e:
        parse_cli(Exp, [override], PRESETS) if override == "noequals" else \
            apply_overrides(Exp(), [override])
    assert needle in str(e.value)


def test_int_accepts_integral_float_strings():
    assert apply_overrides(Exp(), ["train.steps=1e4"]).train.steps == 10000
    assert apply_overrides(Exp(), {"train.steps": 20}).train.steps == 20


def test_yaml_load_types_and_errors(tmp_path):
    p = tmp_path / "c.yaml"
    # YAML 1.1 reads 1e-4 as a *string*: it must still become a float
    p.write_text("name: x\ntrain:\n  lr: 1e-4\n  steps: 5\nmodel:\n  act: relu\n")
    cfg = load_config(Exp, p, ["train.steps=7"])
    assert cfg.train.lr == pytest.approx(1e-4) and cfg.train.steps == 7 and cfg.model.act == "relu"
    p.write_text("name: 123\n")
    with pytest.raises(ConfigError, match="'name': expected str.*quote"):
        load_config(Exp, p)
    p.write_text("train:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match="train.lrr"):
        load_config(Exp, p)
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Exp, p)
    p.write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Exp, p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Exp, tmp_path / "nope.yaml")
    # a YAML file as a CLI token, layered between preset and overrides
    p.write_text("train:\n  batch_size: 3\n")
    cfg = parse_cli(Exp, ["test_run", str(p), "name=z"], PRESETS)
    assert (cfg.train.steps, cfg.train.batch_size, cfg.name) == (10, 3, "z")
    with pytest.raises(ConfigError, match="neither key=value, a preset"):
        parse_cli(Exp, ["unknown_preset"], PRESETS)


def test_dump_yaml_round_trip(tmp_path):
    cfg = apply_overrides(Exp(), ["train.lr=3e-4", "betas=[0.1,0.2]", "tags=[x]",
                                  "train.scheduler_kwargs.pct_start=0.3", "model.dropout=0.25"])
    text = dump_yaml(cfg, tmp_path / "out.yaml")
    assert "loss_multiplier_kl" in text
    back = load_config(Exp, tmp_path / "out.yaml")
    assert back == cfg
    assert to_dict(back)["betas"] == [0.1, 0.2]


def test_required_fields_and_valid_keys():
    @dataclass
    class Req:
        path: str
        n: int = 1

    with pytest.raises(ConfigError, match="missing required key.*path"):
        from_dict(Req, {"n": 2})
    assert from_dict(Req, {"path": "a"}).path == "a"
    keys = valid_keys(Exp)
    assert "train.lr" in keys and "model.width" in keys and "train" not in keys


def test_changed_keys_and_refuse_changes():
    import dataclasses

    from dualdiff.config import ConfigError, changed_keys, refuse_changes
    from dualdiff.train import TrainConfig

    @dataclasses.dataclass
    class Inner:
        a: int = 1
        b: str = "x"

    @dataclasses.dataclass
    class Outer:
        inner: Inner = dataclasses.field(default_factory=Inner)
        train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
        c: float = 0.5

    base = Outer()
    other = Outer(inner=Inner(a=2), c=0.25)
    other.train.lr = 1.0
    assert changed_keys(base, Outer()) == []
    assert changed_keys(base, other) == ["inner.a", "train.lr", "c"]
    refuse_changes(base, other, ["inner.", "train.lr", "c"], "why")  # all allowed
    with pytest.raises(ConfigError, match=r"^why: inner.a, c cannot change \(this command reads train.lr\)$"):
        refuse_changes(base, other, ["train.lr"], "why")
