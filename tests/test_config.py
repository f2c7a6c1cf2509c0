"""Config loading: unknown keys and bad values are one-line errors naming the key (exit code 2)."""
from __future__ import annotations

import pytest
import yaml

from engine.config import Config, ConfigError, load_config, save_config, to_dict
from tests.train_utils import QUICKSTART, run_train


def write_yaml(path, data) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("data, key", [
    ({"train": {"max_step": 10}}, "train.max_step"),
    ({"model": {"moe": {"rooting": "diffmoe"}}}, "model.moe.rooting"),
    ({"trian": {}}, "trian"),
])
def test_unknown_yaml_key_names_full_path(tmp_path, data, key):
    with pytest.raises(ConfigError, match=f"unknown key '{key}'"):
        load_config(write_yaml(tmp_path / "c.yaml", data))


@pytest.mark.parametrize("override, key", [
    ("train.max_steps=ten", "train.max_steps"),
    ("train.precision=fp64", "train.precision"),
    ("train.lr=-1", "train.lr"),
    ("train.betas=[0.9]", "train.betas"),
    ("train.progress=maybe", "train.progress"),
    ("train.save_every=-5", "train.save_every"),
    ("train.max_nonfinite_steps=0", "train.max_nonfinite_steps"),
    ("eval.cfg_scale=0.5", "eval.cfg_scale"),
    ("eval.sample_steps=0", "eval.sample_steps"),
    ("train.nonsense=1", "train.nonsense"),
    ("model.moe.nonsense.deep=1", "model.moe.nonsense"),
    ("parallel.zero_stage=0", "parallel.zero_stage"),
    ("parallel.zero_stage=3", "parallel.zero_stage"),
])
def test_bad_override_names_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(QUICKSTART, [override])
    assert key in str(e.value) and "\n" not in str(e.value)


def test_overrides_apply_and_types_coerce():
    cfg = load_config(QUICKSTART, ["train.max_steps=7", "train.lr=3e-4", "train.betas=[0.8,0.95]",
                                   "train.output_dir=/tmp/x"])
    assert (cfg.train.max_steps, cfg.train.lr, cfg.train.betas) == (7, 3e-4, (0.8, 0.95))
    assert str(cfg.run_dir) == "/tmp/x"


def test_exponent_without_dot_is_a_number(tmp_path):
    """YAML 1.1 reads `1e-4` (no dot) as a string; float keys accept it, in files and overrides."""
    assert load_config(QUICKSTART, ["train.lr=1e-4"]).train.lr == 1e-4
    assert load_config(write_yaml(tmp_path / "c.yaml", {"train": {"lr": "3e-4"}})).train.lr == 3e-4


def test_default_run_dir_is_config_name():
    cfg = load_config(QUICKSTART)
    assert cfg.name == "quickstart" and str(cfg.run_dir) == "runs/quickstart"


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(QUICKSTART, ["train.max_steps=3", "model.depth=3"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg) and isinstance(again, Config)


@pytest.mark.parametrize("overrides, needle", [
    (["train.bogus=1"], "train.bogus"),  # caught while loading the config
    (["parallel.zero_stage=3"], "parallel.zero_stage: must be 1 or 2"),  # caught by the cross-field checks
])
def test_train_entry_point_config_error_is_one_line_exit_2(tmp_path, overrides, needle):
    proc = run_train(QUICKSTART, overrides + [f"train.output_dir={tmp_path / 'run'}"], check=False)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("config error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_train_entry_point_missing_config_file(tmp_path):
    proc = run_train(str(tmp_path / "nope.yaml"), [], check=False)
    assert proc.returncode == 2 and "config file not found" in proc.stderr and "Traceback" not in proc.stderr
