"""Distilled decoding (DD1) of a VAR teacher: the scale-by-scale teacher map, the block-causal student, the 2-step
pass over scale-index splits, pairs, task=distill with a VAR teacher.

A toy teacher throughout: VAR (depth 1, width 32) on a toy msvq (V = 8 codes in d = 2, scales 1, 2, 3 = 14
tokens, 2 classes), random weights made peaky; the end-to-end test trains through train.py on an untrained msvq
tokenizer run and an untrained exported VAR teacher.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from scipy.stats import chisquare

import generators.distill_student as dd
from decoding.distilled import code_vectors, teacher_map_of, var_teacher_map
from decoding.flow_map import flow_sigma_range
from decoding.registry import get_decoder
from decoding.sampling import SamplingConfig, logits_to_probs
from generators.distill_student import build_pairs, load_pairs
from generators.distill_var import DistilledVAR
from generators.var import VAR
from tests.conftest import TINY, distill_kill_resume_then_sample
from tokenizers.msvq import MultiScaleVQ
from utils.checkpoint import export_run

V, D_CODE, NC, SCALES = 8, 2, 2, (1, 2, 3)
L = sum(s * s for s in SCALES)  # 14
SAMPLING = SamplingConfig(cfg_scale=1.5, temperature=1.0, top_k=0, top_p=1.0)  # VAR: cfg ramp 1.5 * k / (K-1)
FLOW = {"steps": 16, "solver": "rk4"}

pytestmark = pytest.mark.usefixtures("one_thread")


def toy_var(seed=0, noise=0.5, scales=SCALES):
    torch.manual_seed(seed)
    model = VAR(V, NC, scales, D_CODE, depth=1, width=32, heads=2, class_dropout=0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))  # far from uniform p
    return model.eval()


def toy_msvq(scales=SCALES):
    torch.manual_seed(1)
    q = MultiScaleVQ(D_CODE, V, scales)
    with torch.no_grad():
        q.embedding.weight.normal_()  # well-separated codes
    return q.eval()


@pytest.fixture(scope="module")
def msvq():
    return toy_msvq()


def student_of(teacher, msvq, splits=(0, 2)):
    codes = code_vectors(msvq)
    student = DistilledVAR(VAR(V, NC, teacher.scales, D_CODE, depth=1, width=32, heads=2, class_dropout=0.0), codes,
                           splits)
    student.init_from_teacher(teacher)
    return student.eval()


def noise(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, L, D_CODE, generator=g), torch.arange(n) % NC


def tmap(teacher, msvq, lab, eps, sampling=SAMPLING, **kw):
    codes = code_vectors(msvq)
    return var_teacher_map(teacher, lab, eps, sampling, codes, flow_sigma_range(codes), flow_steps=16,
                           tokenizer=msvq, **kw)


def test_var_map_is_the_var_sampler_at_temperature_zero(msvq):
    """Greedy p (temperature 0) makes the map the argmax chain: it must equal VAR.generate's tokens exactly, which
    checks the CFG ramp, the scale order and the msvq inputs of scales >= 1 against the reference sampler."""
    teacher = toy_var()
    eps, lab = noise(32, 0)
    greedy = SamplingConfig(cfg_scale=1.5, temperature=0.0)
    ref = VAR.flatten_indices(teacher.generate(msvq, lab, cfg=1.5, temperature=0.0))  # (B, L)
    assert torch.equal(tmap(teacher, msvq, lab, eps, greedy), ref)
    assert teacher_map_of(teacher) is var_teacher_map


def test_var_same_noise_gives_the_same_tokens(msvq):
    teacher = toy_var()
    eps, lab = noise(64, 0)
    a = tmap(teacher, msvq, lab, eps)
    assert torch.equal(a, tmap(teacher, msvq, lab, eps.clone())) and (a != tmap(teacher, msvq, lab, noise(64, 1)[0])).any()
    assert torch.equal(tmap(teacher, msvq, lab[:5], eps[:5]), a[:5])  # rows independent of their batch neighbours
    student = student_of(teacher, msvq)
    assert torch.equal(student.predict(eps, None, 0, lab), student.predict(eps.clone(), None, 0, lab))
    dec = get_decoder("distilled")
    for steps in (1, 2):
        x, _ = dec.run(student, lab, SAMPLING, torch.Generator().manual_seed(3), msvq, {"steps": steps})
        y, _ = dec.run(student, lab, SAMPLING, torch.Generator().manual_seed(3), msvq, {"steps": steps})
        assert torch.equal(x, y)


def test_var_map_prefix_continues_the_full_map(msvq):
    """Decoding scales m.. after the map's own first m scales gives the full map's tokens (same noise)."""
    teacher = toy_var()
    eps, lab = noise(32, 2)
    full = tmap(teacher, msvq, lab, eps)
    assert torch.equal(tmap(teacher, msvq, lab, eps, prefix=full[:, :5]), full)  # scales 0, 1 given
    assert torch.equal(tmap(teacher, msvq, lab, eps, prefix=full[:, :1], stop=5), full[:, :5])
    with pytest.raises(ValueError, match="scale boundaries"):
        tmap(teacher, msvq, lab, eps, prefix=full[:, :3])


def test_var_map_follows_the_teachers_p_at_every_token_of_a_scale(msvq):
    """Scale 1 (4 tokens decided at once) after a fixed scale-0 token: each position's tokens are distributed as the
    teacher's p there (the CFG ramp at k = 1, temperature); the 4 positions' noises are used independently.
    Negative control: the same counts against p with 0.03 of the top code's mass moved are rejected."""
    teacher = toy_var()
    n = 20000
    eps = torch.randn(n, L, D_CODE, generator=torch.Generator().manual_seed(5))
    lab = torch.zeros(n, dtype=torch.long)
    prefix = torch.full((n, 1), 3)
    tok = tmap(teacher, msvq, lab, eps, prefix=prefix, stop=5)[:, 1:5]  # (n, 4)
    both = teacher.class_emb.with_null(lab[:1])
    inputs = msvq.teacher_inputs([prefix[:1].view(1, 1, 1)]).repeat(2, 1, 1)  # scale 1's input, (2, 4, d)
    logits = teacher(None, both, inputs, drop_labels=False)[:, 1:5]  # (2, 4, V) at scale 1
    g = 1.5 * 1 / 2
    p = logits_to_probs((1 + g) * logits[0] - g * logits[1], 1.0).detach().double()  # (4, V)
    for j in range(4):
        counts = torch.bincount(tok[:, j], minlength=V).double()
        keep = p[j] > 1e-6
        assert counts[~keep].sum() == 0
        assert chisquare(counts[keep].numpy(), (p[j][keep] / p[j][keep].sum() * n).numpy()).pvalue > 1e-3, j
        wrong = p[j][keep].clone()  # 0.03 of the top code's mass moved to the others
        wrong += 0.03 / (wrong.numel() - 1)
        wrong[wrong.argmax()] -= 0.03 + 0.03 / (wrong.numel() - 1)
        assert chisquare(counts[keep].numpy(), (wrong / wrong.sum() * n).numpy()).pvalue < 1e-6, j
    assert abs(torch.corrcoef(tok[:, :2].T.double())[0, 1]) < 0.05  # independent given scale 0


def test_var_student_is_block_causal(msvq):
    """Token j of scale k depends on the noise of scales <= k only: noise of the last scale changes no earlier logit."""
    student = student_of(toy_var(), msvq)
    eps, lab = noise(4, 6)
    x, is_data = student.inputs(eps, None, 0)
    a = student(x, is_data, lab)
    x2 = x.clone()
    x2[:, 5:] += 1.0  # scale 2
    b = student(x2, is_data, lab)
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6) and not torch.allclose(a[:, 5:], b[:, 5:])
    x3 = x.clone()
    x3[:, 1:5] += 1.0  # scale 1 reaches scale 2
    assert not torch.allclose(student(x3, is_data, lab)[:, 5:], a[:, 5:])


def test_var_two_step_keeps_the_first_scales_and_reuses_the_noise(msvq, monkeypatch):
    student = student_of(toy_var(), msvq)
    with torch.no_grad():  # make the two steps differ: step 2's inputs carry codes where step 1's carried noise
        student.type_embed.weight.normal_(std=1.0)
    calls = []
    forward = DistilledVAR.forward

    def spy(self, x, is_data, cond):
        logits = forward(self, x, is_data, cond)
        calls.append((x.clone(), is_data.clone(), logits.argmax(-1)))
        return logits

    monkeypatch.setattr(DistilledVAR, "forward", spy)
    lab = torch.arange(16) % NC
    tokens, stats = get_decoder("distilled").run(student, lab, SAMPLING, torch.Generator().manual_seed(0), msvq,
                                                 {"steps": 2, "split": 2})
    assert len(calls) == 2 and stats["forward_passes"] == 2
    (x1, d1, t1), (x2, d2, t2) = calls
    t = 5  # scales 0 and 1 decided
    assert not d1.any() and torch.equal(d2, torch.arange(L) < t)
    assert torch.equal(tokens[:, :t], t1[:, :t])  # the first split's tokens of step 1 are kept
    assert torch.equal(x2[:, :t], student.codes[t1[:, :t]])  # ... fed as their code vectors
    assert torch.equal(x2[:, t:], x1[:, t:])  # the SAME noise after the split
    assert torch.equal(tokens[:, t:], t2[:, t:])
    assert (t1[:, t:] != t2[:, t:]).any()  # the second step decided something (else the checks above are vacuous)


def test_var_teacher_involved_decodes_the_middle_scales_with_the_teacher():
    """Scales 1, 2, 3, 4 (tokens 0 | 1-4 | 5-13 | 14-29), split 3, teacher_from 2: the student's scales 0..1, the
    teacher's scale 2 (from the same noise), the student's second step on scale 3."""
    msvq4 = toy_msvq((1, 2, 3, 4))
    teacher = toy_var(scales=(1, 2, 3, 4))
    student = student_of(teacher, msvq4, splits=(0, 3))
    dec = get_decoder("distilled")
    settings = dec.parse_settings({"steps": 2, "split": 3, "teacher_from": 2, "flow_steps": 16})
    settings.teacher = teacher
    lab = torch.arange(8) % NC
    tokens, stats = dec.run(student, lab, SAMPLING, torch.Generator().manual_seed(4), msvq4, settings)
    eps = student.noise(8, torch.Generator().manual_seed(4), "cpu")
    first = student.predict(eps, None, 0, lab)
    expect = var_teacher_map(teacher, lab, eps, SAMPLING, student.codes, student.sigmas, first[:, :5], 14, 16,
                             tokenizer=msvq4)
    assert torch.equal(tokens[:, :5], first[:, :5]) and torch.equal(tokens[:, :14], expect)
    assert (expect[:, 5:14] != first[:, 5:14]).any()  # the teacher did change scale 2 (else the check is vacuous)
    assert torch.equal(tokens, student.predict(eps, expect, 3, lab))
    assert stats["teacher_forward_passes"] == 1 and stats["forward_passes"] == 3  # one prefill of scales 0..2


def test_var_student_reproduces_the_teacher_map_on_held_out_noise(msvq):
    """~10 s: 2500 pairs, 200 AdamW steps of 64. Held-out 1-step token accuracy >= 0.8 over all 14 tokens, and on
    every scale at most 0.6 of the error of the best constant guess per position (the majority token); the second
    step (true scales 0..1) beats the first on scale 2."""
    teacher = toy_var()
    eps, lab = noise(3000, 7)
    tok = tmap(teacher, msvq, lab, eps)
    student = student_of(teacher, msvq).train()
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(200):
        i = torch.randint(0, 2500, (64,))
        loss, _ = student.loss((eps[i], tok[i]), lab[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    student.eval()
    held, target = slice(2500, 3000), tok[2500:]
    acc = (student.predict(eps[held], None, 0, lab[held]) == target).double().mean(0)  # (L,)
    majority = torch.stack([torch.bincount(target[:, j], minlength=V).max() for j in range(L)]).double() / 500
    per_scale = [(acc[b:e].mean(), majority[b:e].mean()) for b, e in student.var.bounds]
    assert acc.mean() >= 0.8, acc
    assert all(1 - a <= 0.6 * (1 - m) for a, m in per_scale), per_scale  # measured: 0.45, 0.03, 0.16 of it
    acc2 = (student.predict(eps[held], target, 2, lab[held]) == target).double()[:, 5:].mean()
    assert acc2 > acc[5:].mean()


def test_var_pairs_are_rebuilt_for_a_changed_teacher_and_resume(msvq, tmp_path, monkeypatch):
    from utils.runs import run_hash

    teacher = toy_var()
    run = tmp_path / "teacher"
    export_run(teacher, {"generator": {"name": "var"}}, run, kind="generator")
    calls = []
    chunk = dd.generate_chunk
    monkeypatch.setattr(dd, "generate_chunk", lambda *a: calls.append(a[6]) or chunk(*a))
    codes = code_vectors(msvq)
    args = {"codes": codes, "sampling": SAMPLING, "flow": FLOW, "num_classes": NC, "root": tmp_path / "pairs",
            "chunk_size": 16, "batch_size": 8, "tokenizer": msvq}
    first = build_pairs(teacher, run_hash(run), num_pairs=40, **args)
    assert len(calls) == 3
    pairs = load_pairs(first, 40)
    assert pairs["eps"].shape == (40, L, D_CODE) and pairs["tokens"].shape == (40, L)
    assert torch.equal(pairs["tokens"].long(), tmap(teacher, msvq, pairs["labels"], pairs["eps"]))
    calls.clear()
    assert build_pairs(teacher, run_hash(run), num_pairs=40, **args) == first and not calls  # reused
    (first / "chunk_00001.safetensors").unlink()  # a killed build: only the missing chunk is made
    build_pairs(teacher, run_hash(run), num_pairs=40, **args)
    assert len(calls) == 1 and torch.equal(load_pairs(first, 40)["tokens"], pairs["tokens"])

    calls.clear()  # retrained teacher: new hash, new folder, new pairs
    changed = toy_var(seed=9)
    export_run(changed, {"generator": {"name": "var"}}, run, kind="generator")
    second = build_pairs(changed, run_hash(run), num_pairs=40, **args)
    assert second != first and len(calls) == 3
    assert not torch.equal(load_pairs(second, 40)["tokens"], pairs["tokens"])
    calls.clear()  # other sampling settings (no CFG ramp): another folder too
    other = build_pairs(changed, run_hash(run), num_pairs=40, **dict(args, sampling=SamplingConfig(cfg_scale=0.0)))
    assert other not in (first, second) and len(calls) == 3


def test_var_bad_settings_name_the_fix(msvq):
    teacher = toy_var()
    codes = code_vectors(msvq)
    with pytest.raises(ValueError, match="scale indices"):
        DistilledVAR(VAR(V, NC, SCALES, D_CODE, depth=1, width=32, heads=2), codes, [0, 3])  # 3 scales: 0..2
    with pytest.raises(ValueError, match="msvq tokenizer"):
        var_teacher_map(teacher, torch.zeros(1, dtype=torch.long), torch.zeros(1, L, D_CODE), SAMPLING, codes,
                        flow_sigma_range(codes))
    assert DistilledVAR.resolve_splits([0, 0.5], teacher) == [0, 2]  # a float: that fraction of the 3 scales
    with pytest.raises(ValueError, match="scale indices"):
        DistilledVAR.resolve_splits([0, 3], teacher)  # checked before any pair is built
    with pytest.raises(ValueError, match="trained on splits"):
        get_decoder("distilled").run(student_of(teacher, msvq), torch.arange(2), SAMPLING, None, msvq,
                                     {"steps": 2, "split": 1})


# ----------------------------------------------------------------------------------------------
# task=distill with a VAR teacher through train.py and sample.py
# ----------------------------------------------------------------------------------------------

def make_var_teacher_run(tmp_path: Path) -> Path:
    """An untrained msvq tokenizer run (scales 1, 2, 4) and an untrained (randomised) VAR exported as a finished run."""
    from tests.test_generator_training import make_tokenizer_run
    from utils.runs import run_hash

    tok = make_tokenizer_run(tmp_path / "msvq", "msvq")
    torch.manual_seed(0)
    model_node = {"_target_": "generators.var.build_var", "name": "VAR-demo", "depth": 1, "width": 32, "heads": 2,
                  "class_dropout": 0.1}
    args = {"vocab_size": 32, "num_classes": 4, "scales": [1, 2, 4], "code_dim": 8}
    var = VAR(**{k: v for k, v in model_node.items() if k not in ("_target_", "name")}, **args)
    with torch.no_grad():
        for p in var.parameters():
            p.add_(0.3 * torch.randn_like(p))
    config = {"generator": {"name": "var", "model": model_node,
                            "sampling": {"cfg_scale": 1.5, "temperature": 1.0, "top_k": 0, "top_p": 1.0}},
              "data": {"name": "synthetic", "image_size": 16, "channels": 1, "num_classes": 4},
              "tokenizer": {"path": str(tok), "hash": run_hash(tok), "name": "msvq"},
              "tokens": {"layout": "multiscale", "token_shape": [[1, 1], [2, 2], [4, 4]], "scale_factor": 1.0},
              "model_args": args}
    export_run(var, config, tmp_path / "teacher", kind="generator")
    return tmp_path / "teacher"


DISTILL = TINY + ["task=distill", "distill.num_pairs=96", "distill.val_pairs=16", "distill.chunk_size=32",
                  "distill.batch_size=16", "distill.flow_steps=8", "distill.splits=[0,2]",
                  "distill.eval.grid_per_class=2", "distill.eval.grid_classes=2", "distill.optimizer.warmup_steps=2",
                  "trainer.max_steps=8", "trainer.val_check_interval=4", "callbacks.last_checkpoint.every_n_train_steps=3",
                  "callbacks.model_checkpoint=null", "callbacks.lr_monitor=null", "callbacks.progress_bar=null"]


@pytest.mark.slow
def test_task_distill_var_kill_resume_then_sample(tmp_path):
    teacher = make_var_teacher_run(tmp_path)
    common = DISTILL + [f"teacher_ckpt={teacher}", f"paths.data_dir={tmp_path / 'data'}"]
    cfg, result = distill_kill_resume_then_sample(tmp_path, common, teacher_from=1)
    assert cfg["kind"] == "distill" and cfg["generator"]["name"] == "dd_var"
    assert cfg["distill"]["splits"] == [0, 2] and len(cfg["distill"]["teacher"]["hash"]) == 64
    assert result["speed"]["forward_passes_per_image"] == 2 + 1 and Path(result["grid"]).exists()
