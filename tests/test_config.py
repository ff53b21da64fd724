"""SoMEConfig: the seed's presets, YAML round trip, --set overrides and their errors."""
import dataclasses

import pytest

from some.errors import ConfigError
from some.fields import parse_value
from some.runs import PRESETS, SoMEConfig, apply_overrides, get_preset

SEED_VALUES = dict(d_model=512, n_layers=10, n_heads=8, seq_len=768, batch_size=32, vocab_size=8192, d_ffn=1024,
                   top_k=4, alpha=0.01, beta=0.005, delta=0.001, theta_percentile=0.05, ema_decay=0.99,
                   train_subset_size=10000, val_subset_size=2000, learning_rate=6e-4, temperature=0.8, epochs=4,
                   router="mlp", expert_init="default", data_source="tinystories")


@pytest.mark.parametrize("name, n", [("A4", 64), ("B1", 128), ("B2", 256), ("B3", 512)])
def test_reference_presets_have_the_seed_values(name, n):
    config = get_preset(name)
    assert config.num_experts == n
    for key, value in SEED_VALUES.items():
        assert getattr(config, key) == value, key
    assert config.nominal_steps_per_epoch == 312  # 10000 // 32, last partial batch dropped


def test_all_presets_are_valid_and_small_ones_are_small():
    for name in PRESETS:
        get_preset(name)
    assert get_preset("tiny").data_source == "fortunes"  # offline corpus
    assert get_preset("tiny-test").data_source == "synthetic"
    assert get_preset("tiny-test").d_model < get_preset("tiny").d_model < 512


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError) as e:
        get_preset("A5")
    message = str(e.value)
    assert "unknown preset 'A5'" in message and "did you mean A4" in message
    for name in PRESETS:
        assert name in message


def test_yaml_round_trip(tmp_path):
    config = apply_overrides(get_preset("tiny"), ["ood_source=none", "learning_rate=1e-3"])
    config.save_yaml(tmp_path / "c.yaml")
    loaded = SoMEConfig.load_yaml(tmp_path / "c.yaml")
    assert loaded == config
    assert isinstance(loaded.min_learning_rate, float)


def test_yaml_with_unknown_key_names_file_and_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("num_experts: 16\nlearnig_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown config key 'learnig_rate'; did you mean 'learning_rate'"):
        SoMEConfig.load_yaml(path)
    path.write_text("num_experts: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        SoMEConfig.load_yaml(path)
    with pytest.raises(ConfigError, match="not found"):
        SoMEConfig.load_yaml(tmp_path / "missing.yaml")


def test_overrides_convert_to_the_field_types():
    base = get_preset("A4")
    config = apply_overrides(base, ["num_experts=128", "alpha=0", "packed=true", "ood_source=bible",
                                    "cache_dir=none", "gating=sigmoid", "train_subset_size=1e3"])
    assert config.num_experts == 128 and isinstance(config.num_experts, int)
    assert config.alpha == 0.0 and isinstance(config.alpha, float)
    assert config.packed is True
    assert config.ood_source == "bible" and config.cache_dir is None
    assert config.gating == "sigmoid"
    assert config.train_subset_size == 1000
    assert base.num_experts == 64  # the input is not modified
    assert set(config.diff(base)) == {"num_experts", "alpha", "packed", "ood_source", "gating", "train_subset_size"}


@pytest.mark.parametrize("override, message", [
    ("num_expert=3", "unknown config key 'num_expert'; did you mean 'num_experts'"),
    ("epochs=two", "--set epochs=two: expected an integer, got 'two'"),
    ("epochs=1.5", "expected an integer"),
    ("learning_rate=fast", "expected a number"),
    ("packed=maybe", "expected a boolean"),
    ("top_k=100", "top_k = 100 must be in 1..num_experts"),
    ("gating=majority", "gating = 'majority'; expected one of"),
    ("n_heads=7", "d_model = 512 must be divisible by n_heads = 7"),
    ("grad_accum=5", "batch_size = 32 must be divisible by grad_accum = 5"),
    ("epochs=0", "'epochs' must be >= 1"),
    ("nonsense", "expects key=value"),
])
def test_bad_overrides_give_clear_errors(override, message):
    with pytest.raises(ConfigError) as e:
        apply_overrides(get_preset("A4"), [override])
    assert message in str(e.value)


def test_parse_value_optional_and_bool():
    from typing import Optional  # both spellings of an optional field must work

    for optional_str in (Optional[str], str | None):  # noqa: UP045
        assert parse_value("null", optional_str) is None
        assert parse_value("x", optional_str) == "x"
    assert parse_value("7", int | None) == 7
    assert parse_value("off", bool) is False


def test_validate_checks_types_of_direct_construction():
    with pytest.raises(ConfigError, match="'d_model' must be int"):
        dataclasses.replace(get_preset("tiny"), d_model="64").validate()


def test_every_layer_and_data_field_is_a_config_field():
    """New SoMELayerConfig/DataConfig fields must reach the experiment config."""
    from some.data import DataConfig
    from some.nn import SoMELayerConfig

    fields = {f.name for f in dataclasses.fields(SoMEConfig)}
    missing = {f.name for f in dataclasses.fields(SoMELayerConfig)} - fields
    assert not missing, f"SoMEConfig lacks the layer fields {missing}"
    config = get_preset("tiny")
    layer = config.layer_config()
    assert layer.num_experts == config.num_experts and layer.alpha == config.alpha
    data = config.data_config()
    assert isinstance(data, DataConfig)
    assert (data.source, data.seq_len, data.vocab_size, data.train_subset_size) == (
        config.data_source, config.seq_len, config.vocab_size, config.train_subset_size)


def test_each_config_is_checked_once_at_each_boundary(tmp_path, capsys):
    """One `some train --preset ... --set ...`: the experiment config is checked where it enters
    (the preset, the overrides, config.yaml read back for the report), not again by the trainer
    (its configuration on the device only resolves `precision` from checked values); the model
    checks the architecture it is given (ModelConfig) once, and the layers share one checked
    layer config."""
    from some.cli import main
    from some.fields import CHECKS_RUN

    CHECKS_RUN.clear()
    assert main(["train", "--preset", "tiny-test", "--out", str(tmp_path / "r"), "--no-plots", "--no-progress",
                 "--set", f"cache_dir={tmp_path / 'c'}", "epochs=1"]) == 0
    # (before the checks were made once per boundary: 5, 5, 7 and 6)
    assert CHECKS_RUN["SoMEConfig.validate"] == 3
    assert CHECKS_RUN["ModelConfig.validate"] == 3 + 1  # + the model's own architecture
    assert CHECKS_RUN["SoMELayerConfig.validate"] == 3 + 1 + 1  # + inside that one, + the layers' shared config
    assert CHECKS_RUN["DataConfig.validate"] == 3 + 1  # + build_data's own check of what it is given


def test_a_changed_config_is_checked_again():
    config = get_preset("tiny-test")
    config.validate()
    config.top_k = 99  # more than num_experts
    with pytest.raises(ConfigError, match="top_k"):
        config.validate()
