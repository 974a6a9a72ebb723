"""The command lines: --help, checks before Hydra makes a run folder, the printed config, the README's commands."""
from __future__ import annotations

import os
import re
import shlex

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from tests.conftest import ROOT, compose_config, run_entry
from utils.hydra import check_command_line, help_text


def _exit_message(config_name, argv, check=None, intro="") -> str:
    with pytest.raises(SystemExit) as err:
        check_command_line(config_name, argv, intro, check)
    return str(err.value.code)


def test_private_config_files_are_no_options(tmp_path):
    """Issue 15.9: the shared autoencoder piece is neither in --help nor in Hydra's 'available options'."""
    with pytest.raises((MissingConfigException, ConfigCompositionException)) as err:
        compose_config("train", ["tokenizer=nonexistent"], tmp_path)
    assert "fsq" in str(err.value) and "_autoencoder" not in str(err.value) and "\t_" not in str(err.value)
    text = help_text("train", "")
    assert "tokenizer" in text and "fsq" in text and "_autoencoder" not in text and "_shared" not in text


def test_a_misspelled_key_names_the_closest_valid_one():
    """Issue 15.10: no `+trainer.max_stepz` advice; the closest key instead."""
    message = _exit_message("train", ["trainer.max_stepz=3"])
    assert "trainer.max_stepz is not a key" in message and "Did you mean trainer.max_steps?" in message
    assert "+trainer.max_stepz" not in message


def test_a_failed_command_line_leaves_no_folder_and_a_failed_run_logs_its_error(tmp_path):
    """Issues 15.10 (task=tokenzier is checked before any folder exists) and 15.14 (the run's log holds its error)."""
    typo = run_entry("train.py", ["task=tokenzier", f"hydra.run.dir={tmp_path / 'typo'}"])
    assert typo.returncode != 0 and "tokenizer" in typo.stderr and not (tmp_path / "typo").exists()
    failed = run_entry("train.py", ["task=generator", f"tokenizer_ckpt={tmp_path / 'nowhere'}",
                                    f"hydra.run.dir={tmp_path / 'failed'}"])
    assert failed.returncode != 0
    log = (tmp_path / "failed" / "train.log").read_text()
    assert "does not exist" in log and str(tmp_path / "nowhere") in log
    assert sorted(p.name for p in (tmp_path / "failed").iterdir()) == [".hydra", "train.log"]


@pytest.mark.parametrize("script,arg,key", [("train", "data.image_size=0", "data.image_size"),
                                            ("train", "data.batch_size=-4", "data.batch_size"),
                                            ("sample", "top_p=1.5", "top_p"), ("sample", "temperature=-1", "temperature"),
                                            ("sample", "num_images=-3", "num_images"),
                                            ("sample", "fid.num_samples=-10", "fid.num_samples")])
def test_values_out_of_range_are_named(script, arg, key):
    """Issue 15.11."""
    from sample import check_sample_config
    from train import check_train_config

    check = check_train_config if script == "train" else check_sample_config
    extra = ["ckpt=some/run"] if script == "sample" else []
    message = _exit_message(script, [*extra, arg], check)
    assert f"{arg} is out of range" in message


def test_in_range_values_pass():
    """The negative control of the range checks: the edges that are valid pass."""
    from sample import check_sample_config

    check_command_line("sample", ["ckpt=x", "top_p=1.0", "temperature=0.5", "top_k=0", "cfg_scale=0"], "",
                       check_sample_config)


def test_help_shows_what_each_script_takes(capsys):
    """Issue 15.12: sample.py's help has no train.py groups; train.py's opens with the tasks and an example each."""
    from sample import check_sample_command_line
    from train import HELP

    with pytest.raises(SystemExit):
        check_sample_command_line(["--help"])
    text = capsys.readouterr().out
    assert "ckpt" in text and "top_p" in text and "decoding" in text
    for train_only in ("data ", "tokenizer ", "trainer ", "callbacks ", "experiment "):
        assert f"  {train_only}" not in text, train_only
    with pytest.raises(SystemExit):
        check_command_line("train", ["--help"], HELP)
    text = capsys.readouterr().out
    first = text.split("Config groups")[0]
    assert "task=tokenizer" in first and "task=generator" in first
    assert "python train.py task=tokenizer tokenizer=fsq" in first and "tokenizer_ckpt=" in first


def test_the_printed_config_is_the_one_the_run_uses(tmp_path):
    """Issue 15.13: task=generator composes the generator's monitor (what --cfg job prints), not the tokenizer's."""
    cfg = compose_config("train", ["task=generator"], tmp_path)
    assert (cfg.task, cfg.monitor.metric, cfg.monitor.mode, cfg.optimized_metric) == ("generator", "val/loss", "min",
                                                                                   "val/loss")
    assert cfg.callbacks.model_checkpoint.monitor == "val/loss"
    cfg = compose_config("train", ["experiment=demo_generator"], tmp_path)
    assert cfg.task == "generator" and cfg.monitor.metric == "val/loss"
    cfg = compose_config("train", [], tmp_path)
    assert (cfg.task, cfg.monitor.metric) == ("tokenizer", "val/psnr")


def test_progress_bar_refreshes_every_step(tmp_path):
    """Issue 15.15: a short run's training bar moves (Lightning's bar refreshes every refresh_rate steps)."""
    cfg = compose_config("train", [], tmp_path)
    assert cfg.callbacks.progress_bar.refresh_rate == 1


def readme_commands() -> list[tuple[str, list[str]]]:
    """(script, arguments) of every `python train.py|sample.py ...` line of README.md's bash blocks, split as bash
    would split them."""
    out = []
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    for line in "\n".join(blocks).splitlines():
        found = re.search(r"python (train|sample)\.py(.*)", line)
        if found:
            args = shlex.split(found.group(2).split("#")[0].replace("$HOME", os.environ.get("HOME", "/root")))
            out.append((found.group(1), [a for a in args if "=" in a]))
    return out


def test_readme_commands_parse_as_written():
    """Issue 15.19: every README command line is valid Hydra override syntax (an unquoted ~ is not)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    commands = readme_commands()
    assert len(commands) >= 8 and any("data.root" in " ".join(a) for _, a in commands)
    for script, args in commands:
        parser.parse_overrides([a for a in args if "<" not in a])  # placeholders like <time> aside
