"""Every config composes; unknown options fail with the valid ones listed."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from tests.conftest import CONFIGS, compose_config


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIGS) / group).glob("*.yaml") if not p.stem.startswith("_"))


GROUP_CASES = [(g, o) for g in ("tokenizer", "generator", "data", "trainer", "logger", "callbacks", "debug",
                                 "experiment") for o in options(g)]


@pytest.mark.parametrize("group,option", GROUP_CASES, ids=[f"{g}={o}" for g, o in GROUP_CASES])
def test_every_config_composes(group, option, tmp_path):
    extra = ["data.root=/tmp"] if (group, option) == ("data", "image_folder") else []
    cfg = compose_config("train", [f"{group}={option}", *extra], tmp_path)
    assert cfg.task in ("tokenizer", "generator", "drafter", "distill")
    from train import check_train_config

    check_train_config(cfg)  # the task, its monitor and the ranges a run checks before it starts
    assert cfg.trainer._target_ == "lightning.Trainer"
    if group == "tokenizer":
        assert cfg.tokenizer.quantizer._target_.startswith("tokenizers.")
        # the shared autoencoder block, overlaid with the tokenizer file's own autoencoder keys
        shared = yaml.safe_load((Path(CONFIGS) / "_shared" / "autoencoder.yaml").read_text())["autoencoder"]
        own = yaml.safe_load((Path(CONFIGS) / "tokenizer" / f"{option}.yaml").read_text()).get("autoencoder") or {}
        assert OmegaConf.to_container(cfg.tokenizer.autoencoder, resolve=True) == {**shared, **own}
    if group == "generator":
        assert cfg.generator.name == option and cfg.generator.model._target_.startswith("generators.")


def test_sample_config_composes(tmp_path):
    cfg = compose_config("sample", ["ckpt=some/run"], tmp_path)
    assert cfg.ckpt == "some/run"
    assert cfg.num_images == yaml.safe_load((Path(CONFIGS) / "sample.yaml").read_text())["num_images"]
    assert cfg.decoding.name == "ar" and cfg.fid.num_samples == 0


def test_unknown_option_lists_valid_ones(tmp_path):
    with pytest.raises((MissingConfigException, ConfigCompositionException)) as err:
        compose_config("train", ["tokenizer=nonexistent"], tmp_path)
    assert "fsq" in str(err.value)  # Hydra names the available options


def test_unknown_key_is_an_error(tmp_path):
    with pytest.raises(ConfigCompositionException) as err:
        compose_config("train", ["trainer.max_stepz=3"], tmp_path)
    assert "max_stepz" in str(err.value)


def test_every_overridden_trainer_flag_is_listed(tmp_path):
    cfg = compose_config("train", [], tmp_path)
    for flag in ("max_steps", "val_check_interval", "limit_train_batches", "limit_val_batches", "precision",
                 "devices", "strategy", "num_nodes", "fast_dev_run", "accumulate_grad_batches"):
        assert flag in cfg.trainer
