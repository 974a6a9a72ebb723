"""CoDe through the entry points: decoding=collaborative in sample.py, and the fine-tuning runs (init_from, distill)."""
from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import compose_config
from tests.test_generator_training import QUANTIZERS, gen_overrides, make_tokenizer_run


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def var_runs(tmp_path_factory):
    """A 'large' (2 layers) and a 'small' (1 layer) VAR on one untrained msvq tokenizer, 6 steps each."""
    from train import train

    root = tmp_path_factory.mktemp("code")
    tok = make_tokenizer_run(root / "msvq", "msvq")
    runs = {}
    for name, depth in (("large", 2), ("small", 1)):
        overrides = gen_overrides("var", tok, root / "data") + [f"generator.model.depth={depth}"]
        train(compose_config("train", overrides, root / name))
        runs[name] = root / name
    return {"tokenizer": tok, "root": root, **runs}


def test_collaborative_through_sample_py(var_runs, tmp_path):
    from sample import run

    cfg = compose_config("sample", [f"ckpt={var_runs['large']}", "decoding=collaborative",
                                    f"decoding.refiner_ckpt={var_runs['small']}", "decoding.drafting_steps=2",
                                    "samples_per_class=2", "classes=[0,1]"], tmp_path / "s")
    result = run(cfg, tmp_path / "s")
    assert result["decoding"] == "collaborative" and result["decoding_settings"]["drafting_steps"] == 2
    saved = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert saved["decoding_settings"]["refiner_ckpt"] == str(var_runs["small"])
    assert saved["speed"]["forward_passes_per_image"] == 3  # 2 drafter scales + 1 refiner scale


def test_refiner_on_another_tokenizer_is_refused(var_runs, tmp_path):
    from sample import run
    from train import train
    from utils.checkpoint import CheckpointError

    other = make_tokenizer_run(tmp_path / "msvq2", "msvq", seed=1)
    train(compose_config("train", gen_overrides("var", other, tmp_path / "data"), tmp_path / "other"))
    cfg = compose_config("sample", [f"ckpt={var_runs['large']}", "decoding=collaborative",
                                    f"decoding.refiner_ckpt={tmp_path / 'other'}"], tmp_path / "s")
    with pytest.raises(CheckpointError, match="both must share one tokenizer"):
        run(cfg, tmp_path / "s")


def test_distilling_a_run_into_a_copy_of_itself_starts_at_zero_loss(var_runs, tmp_path):
    """init_from = teacher and lr 0: the student is the teacher, so the KL on the chosen scales is 0."""
    from train import train

    overrides = gen_overrides("var", var_runs["tokenizer"], var_runs["root"] / "data") + [
        "generator.model.depth=2", f"generator.init_from={var_runs['large']}",
        f"generator.distill.teacher={var_runs['large']}", "generator.train_scales=[1,2]",
        "generator.optimizer.lr=0.0", "trainer.max_steps=3"]
    metrics, objects = train(compose_config("train", overrides, tmp_path / "student"))
    module = objects["model"]
    assert module.objective.positions.tolist() == [False] + [True] * 20
    assert abs(metrics["val/loss"]) < 1e-5
    teacher = module.objective.teacher
    assert all(torch.equal(a, b.to(a.device)) for a, b in zip(module.model.state_dict().values(),
                                                              teacher.state_dict().values()))


def test_init_from_a_different_architecture_is_refused(var_runs, tmp_path):
    from train import train
    from utils.checkpoint import CheckpointError

    overrides = gen_overrides("var", var_runs["tokenizer"], var_runs["root"] / "data") + [
        "generator.model.depth=3", f"generator.init_from={var_runs['large']}"]
    with pytest.raises(CheckpointError, match="set generator.model to the source's"):
        train(compose_config("train", overrides, tmp_path / "bad"))


def test_refiner_experiment_without_teacher_is_an_error(var_runs, tmp_path):
    from train import train

    overrides = gen_overrides("var", var_runs["tokenizer"], var_runs["root"] / "data") + [
        "generator.distill.required=true"]
    with pytest.raises(ValueError, match="pass generator.distill.teacher"):
        train(compose_config("train", overrides, tmp_path / "nt"))


assert "msvq" in QUANTIZERS
