"""Distilled decoding (DD1): the teacher's noise -> tokens map, the student, the 2-step pass, pairs, task=distill.

A toy teacher (GPT, V = 8 codes in d = 2, L = 4 tokens, 2 classes, random weights made peaky) throughout; the
end-to-end test trains through train.py on an untrained FSQ tokenizer and an untrained exported GPT teacher.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from scipy.stats import chisquare

import generators.distill_student as dd
from decoding.distilled import code_vectors, teacher_map
from decoding.flow_map import flow_sigma_range
from decoding.registry import get_decoder
from decoding.sampling import SamplingConfig, cfg_split_combine, logits_to_probs
from generators.distill_student import DistilledGPT, build_pairs, load_pairs
from generators.gpt import GPT
from tests.conftest import TINY, distill_kill_resume_then_sample
from utils.checkpoint import export_run

V, L, D_CODE, NC = 8, 4, 2, 2
SAMPLING = SamplingConfig(cfg_scale=1.5, temperature=1.0, top_k=0, top_p=1.0)
FLOW = {"steps": 16, "solver": "rk4"}


pytestmark = pytest.mark.usefixtures("one_thread")


def toy_gpt(seed=0, noise=0.5):
    torch.manual_seed(seed)
    model = GPT(V, NC, L, dim=32, depth=2, heads=2, class_dropout=0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))  # far from uniform p
    return model.eval()


@pytest.fixture(scope="module")
def codes():
    return torch.randn(V, D_CODE, generator=torch.Generator().manual_seed(1))


def student_of(teacher, codes, splits=(0, 2)):
    student = DistilledGPT(GPT(V, NC, L, dim=32, depth=2, heads=2, class_dropout=0.0), codes, splits)
    student.init_from_teacher(teacher)
    return student.eval()


def noise(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, L, D_CODE, generator=g), torch.arange(n) % NC


def test_same_noise_gives_the_same_tokens(codes):
    teacher, sig = toy_gpt(), flow_sigma_range(codes)
    eps, lab = noise(64, 0)
    a = teacher_map(teacher, lab, eps, SAMPLING, codes, sig, flow_steps=16)
    b = teacher_map(teacher, lab, eps.clone(), SAMPLING, codes, sig, flow_steps=16)
    other = teacher_map(teacher, lab, noise(64, 1)[0], SAMPLING, codes, sig, flow_steps=16)
    assert torch.equal(a, b) and (a != other).any()
    # each row's tokens do not depend on its batch neighbours (the KV cache rows are independent)
    assert torch.equal(teacher_map(teacher, lab[:5], eps[:5], SAMPLING, codes, sig, flow_steps=16), a[:5])
    student = student_of(teacher, codes)
    assert torch.equal(student.predict(eps, None, 0, lab), student.predict(eps.clone(), None, 0, lab))
    dec = get_decoder("distilled")
    for steps in (1, 2):
        x, _ = dec.run(student, lab, SAMPLING, torch.Generator().manual_seed(3), settings={"steps": steps})
        y, _ = dec.run(student, lab, SAMPLING, torch.Generator().manual_seed(3), settings={"steps": steps})
        assert torch.equal(x, y)


def test_teacher_map_prefix_continues_the_full_map(codes):
    """Decoding positions t.. after the map's own first t tokens gives the full map's tokens (same noise)."""
    teacher, sig = toy_gpt(), flow_sigma_range(codes)
    eps, lab = noise(32, 2)
    full = teacher_map(teacher, lab, eps, SAMPLING, codes, sig, flow_steps=16)
    assert torch.equal(teacher_map(teacher, lab, eps, SAMPLING, codes, sig, full[:, :2], flow_steps=16), full)
    assert torch.equal(teacher_map(teacher, lab, eps, SAMPLING, codes, sig, full[:, :1], 3, flow_steps=16), full[:, :3])


def test_pairs_follow_the_teachers_p(codes):
    """At position 0 the map's tokens are distributed as the teacher's p (the flow map's pushforward); at position 1
    given token 0, too. Negative control: the same counts against another p are rejected."""
    teacher, sig = toy_gpt(), flow_sigma_range(codes)
    n = 20000
    eps = torch.randn(n, L, D_CODE, generator=torch.Generator().manual_seed(5))
    lab = torch.zeros(n, dtype=torch.long)
    tok = teacher_map(teacher, lab, eps, SAMPLING, codes, sig, stop=1, flow_steps=16)[:, 0]
    logits = teacher(torch.zeros(2, L, dtype=torch.long), teacher.cls_embed.with_null(lab[:1]), drop_labels=False)
    p = logits_to_probs(cfg_split_combine(logits[:, 0], SAMPLING.cfg_scale), 1.0)[0].detach().double()  # (V,)
    counts = torch.bincount(tok, minlength=V).double()
    support = p > 1e-6
    assert counts[~support].sum() == 0
    assert chisquare(counts[support].numpy(), (p[support] / p[support].sum() * counts.sum()).numpy()).pvalue > 1e-3
    wrong = 0.9 * p[support] + 0.1 * p[support].roll(1)  # a 10% mix of another p over the same support
    assert chisquare(counts[support].numpy(), (wrong / wrong.sum() * counts.sum()).numpy()).pvalue < 1e-6


def test_two_step_keeps_the_first_tokens_and_reuses_the_noise(codes, monkeypatch):
    teacher = toy_gpt()
    student = student_of(teacher, codes)
    with torch.no_grad():  # make the two steps differ: step 2's inputs carry codes where step 1's carried noise
        student.type_embed.weight.normal_(std=1.0)
    calls = []
    forward = DistilledGPT.forward

    def spy(self, x, is_data, cond):
        logits = forward(self, x, is_data, cond)
        calls.append((x.clone(), is_data.clone(), logits.argmax(-1)))
        return logits

    monkeypatch.setattr(DistilledGPT, "forward", spy)
    lab = torch.arange(16) % NC
    tokens, stats = get_decoder("distilled").run(student, lab, SAMPLING, torch.Generator().manual_seed(0),
                                                 settings={"steps": 2, "split": 2})
    assert len(calls) == 2 and stats["forward_passes"] == 2
    (x1, d1, t1), (x2, d2, t2) = calls
    assert not d1.any() and torch.equal(d2, torch.arange(L) < 2)
    assert torch.equal(tokens[:, :2], t1[:, :2])  # the first t tokens of step 1 are kept
    assert torch.equal(x2[:, :2], codes[t1[:, :2]])  # ... fed as their code vectors
    assert torch.equal(x2[:, 2:], x1[:, 2:])  # the SAME noise after the split
    assert torch.equal(tokens[:, 2:], t2[:, 2:])
    assert (t1[:, 2:] != t2[:, 2:]).any()  # the second step did decide something (else the checks above are vacuous)


def test_teacher_involved_decodes_the_middle_with_the_teacher(codes):
    teacher = toy_gpt()
    student = student_of(teacher, codes)
    dec = get_decoder("distilled")
    settings = dec.parse_settings({"steps": 2, "split": 2, "teacher_from": 0, "flow_steps": 16})
    settings.teacher = teacher
    lab = torch.arange(8) % NC
    g = torch.Generator().manual_seed(4)
    tokens, stats = dec.run(student, lab, SAMPLING, g, settings=settings)
    eps = student.noise(8, torch.Generator().manual_seed(4), "cpu")
    expect = teacher_map(teacher, lab, eps, SAMPLING, codes, student.sigmas, stop=2, flow_steps=16)
    assert torch.equal(tokens[:, :2], expect)
    assert stats["teacher_forward_passes"] == 2 and stats["forward_passes"] == 4


def test_student_reproduces_the_teacher_map_on_held_out_noise(codes):
    """~10 s: 2500 pairs, 500 AdamW steps. Held-out 1-step token accuracy: >= 0.75 at position 0 and >= 0.5 over all
    positions, each well above the best constant guess per position (the majority token)."""
    teacher, sig = toy_gpt(), flow_sigma_range(codes)
    eps, lab = noise(3000, 7)
    tok = teacher_map(teacher, lab, eps, SAMPLING, codes, sig, flow_steps=16)
    student = student_of(teacher, codes).train()
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(500):
        i = torch.randint(0, 2500, (128,))
        loss, _ = student.loss((eps[i], tok[i]), lab[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    student.eval()
    held, target = slice(2500, 3000), tok[2500:]
    acc = (student.predict(eps[held], None, 0, lab[held]) == target).double().mean(0)  # (L,)
    majority = torch.stack([torch.bincount(target[:, j], minlength=V).max() for j in range(L)]).double() / 500
    assert acc[0] >= 0.75 and acc.mean() >= 0.5, acc
    assert (acc > majority + 0.1).all(), (acc, majority)
    acc2 = (student.predict(eps[held], target, 2, lab[held]) == target).double()[:, 2:].mean()
    assert acc2 > acc[2:].mean()  # the second step (true first tokens) is better than the first on the rest


def test_pairs_are_rebuilt_for_a_changed_teacher_and_resume(codes, tmp_path, monkeypatch):
    from utils.runs import run_hash as tokenizer_hash

    teacher = toy_gpt()
    run = tmp_path / "teacher"
    export_run(teacher, {"generator": {"name": "gpt"}}, run, kind="generator")
    calls = []
    chunk = dd.generate_chunk
    monkeypatch.setattr(dd, "generate_chunk", lambda *a: calls.append(a[6]) or chunk(*a))
    args = {"codes": codes, "sampling": SAMPLING, "flow": FLOW, "num_classes": NC, "root": tmp_path / "pairs",
            "chunk_size": 16, "batch_size": 8}
    first = build_pairs(teacher, tokenizer_hash(run), num_pairs=40, **args)
    assert len(calls) == 3
    pairs = load_pairs(first, 40)
    assert pairs["eps"].shape == (40, L, D_CODE) and pairs["tokens"].shape == (40, L)
    sig = flow_sigma_range(codes)
    assert torch.equal(pairs["tokens"].long(), teacher_map(teacher, pairs["labels"], pairs["eps"], SAMPLING, codes, sig,
                                                           flow_steps=16))
    calls.clear()
    assert build_pairs(teacher, tokenizer_hash(run), num_pairs=40, **args) == first and not calls  # reused
    (first / "chunk_00001.safetensors").unlink()  # a killed build: only the missing chunk is made
    build_pairs(teacher, tokenizer_hash(run), num_pairs=40, **args)
    assert len(calls) == 1 and torch.equal(load_pairs(first, 40)["tokens"], pairs["tokens"])

    calls.clear()  # retrained teacher: new hash, new folder, new pairs
    changed = toy_gpt(seed=9)
    export_run(changed, {"generator": {"name": "gpt"}}, run, kind="generator")
    second = build_pairs(changed, tokenizer_hash(run), num_pairs=40, **args)
    assert second != first and len(calls) == 3
    assert not torch.equal(load_pairs(second, 40)["tokens"], pairs["tokens"])
    calls.clear()  # other sampling settings: another folder too
    other = build_pairs(changed, tokenizer_hash(run), num_pairs=40,
                        **dict(args, sampling=SamplingConfig(cfg_scale=1.0, temperature=0.7)))
    assert other not in (first, second) and len(calls) == 3


def test_code_vectors_of_fsq():
    from tokenizers.fsq import FSQ

    q = FSQ(levels=[4, 3])
    vecs = code_vectors(q)
    assert vecs.shape == (12, 2)
    assert torch.equal(q.codes_to_indices(vecs), torch.arange(12))


# ----------------------------------------------------------------------------------------------
# task=distill through train.py and sample.py
# ----------------------------------------------------------------------------------------------

def make_teacher_run(tmp_path: Path) -> Path:
    """An untrained FSQ tokenizer run and an untrained (randomised) GPT exported as a finished generator run."""
    from utils.runs import run_hash as tokenizer_hash
    from tests.test_generator_training import make_tokenizer_run

    tok = make_tokenizer_run(tmp_path / "fsq", "fsq")
    torch.manual_seed(0)
    model_node = {"_target_": "generators.gpt.build_gpt", "name": "GPT-demo", "depth": 1, "dim": 32, "heads": 2,
                  "class_dropout": 0.1}
    args = {"vocab_size": 16, "num_classes": 4, "block_size": 16, "grid_size": [4, 4]}
    gpt = GPT(**{k: v for k, v in model_node.items() if k not in ("_target_", "name")}, **args)
    with torch.no_grad():
        for p in gpt.parameters():
            p.add_(0.3 * torch.randn_like(p))
    config = {"generator": {"name": "gpt", "model": model_node,
                            "sampling": {"cfg_scale": 1.5, "temperature": 1.0, "top_k": 0, "top_p": 1.0}},
              "data": {"name": "synthetic", "image_size": 16, "channels": 1, "num_classes": 4},
              "tokenizer": {"path": str(tok), "hash": tokenizer_hash(tok), "name": "fsq"},
              "tokens": {"layout": "raster", "token_shape": [4, 4], "scale_factor": 1.0}, "model_args": args}
    export_run(gpt, config, tmp_path / "teacher", kind="generator")
    return tmp_path / "teacher"


DISTILL = TINY + ["task=distill", "distill.num_pairs=96", "distill.val_pairs=16", "distill.chunk_size=32",
                  "distill.batch_size=16", "distill.flow_steps=8", "distill.eval.grid_per_class=2",
                  "distill.eval.grid_classes=2", "distill.optimizer.warmup_steps=2", "trainer.max_steps=8",
                  "trainer.val_check_interval=4", "callbacks.last_checkpoint.every_n_train_steps=3",
                  "callbacks.model_checkpoint=null", "callbacks.lr_monitor=null", "callbacks.progress_bar=null"]


@pytest.mark.slow
def test_task_distill_kill_resume_then_sample(tmp_path):
    teacher = make_teacher_run(tmp_path)
    common = DISTILL + [f"teacher_ckpt={teacher}", f"paths.data_dir={tmp_path / 'data'}"]
    cfg, result = distill_kill_resume_then_sample(tmp_path, common, teacher_from=4)
    assert cfg["kind"] == "distill" and cfg["distill"]["teacher"]["path"] == str(teacher.resolve())
    assert cfg["distill"]["splits"] == [0, 8] and len(cfg["distill"]["teacher"]["hash"]) == 64
    assert result["speed"]["forward_passes_per_image"] == 2 + 4 and Path(result["grid"]).exists()


def test_bad_settings_name_the_fix(codes, tmp_path):
    student = student_of(toy_gpt(), codes)
    dec, lab = get_decoder("distilled"), torch.arange(2)
    with pytest.raises(ValueError, match="1 or 2"):
        dec.parse_settings({"steps": 3})
    with pytest.raises(ValueError, match="needs decoding.steps=2"):
        dec.parse_settings({"teacher_from": 1})
    with pytest.raises(ValueError, match="trained on splits"):
        dec.run(student, lab, SAMPLING, settings={"steps": 2, "split": 3})
    with pytest.raises(ValueError, match="teacher is not loaded"):
        dec.run(student, lab, SAMPLING, settings={"steps": 2, "teacher_from": 1})
    with pytest.raises(ValueError, match="applies to dd_gpt"):
        dec.run(toy_gpt(), lab, SAMPLING)
    with pytest.raises(ValueError, match="0 first"):
        DistilledGPT(GPT(V, NC, L, dim=32, depth=1, heads=2), codes, [2])
    # resuming a distill checkpoint with another teacher
    ckpt = tmp_path / "last.ckpt"
    old = {"teacher": {"hash": "a" * 64}, "pairs": {}, "splits": [0, 2], "flow": FLOW, "sampling": {}}
    torch.save({"hyper_parameters": {"config": {"distill": old}}}, ckpt)
    dd.check_same_teacher(ckpt, {"distill": dict(old)})
    with pytest.raises(dd.CheckpointError, match="distill.teacher"):
        dd.check_same_teacher(ckpt, {"distill": dict(old, teacher={"hash": "b" * 64})})


def test_load_teacher_from_moved_runs(tmp_path):
    """A teacher and tokenizer copied elsewhere (a GPU machine) load by hash from their new paths, and only so."""
    import shutil

    teacher = make_teacher_run(tmp_path)
    digest = dd.teacher_hash(teacher)
    moved = tmp_path / "moved"
    shutil.copytree(teacher, moved / "teacher")
    shutil.copytree(tmp_path / "fsq", moved / "fsq")
    shutil.rmtree(teacher)
    shutil.rmtree(tmp_path / "fsq")
    model, tokenizer, _, got = dd.load_teacher(moved / "teacher", "cpu", digest, tokenizer_path=str(moved / "fsq"))
    assert got == digest and model.kind == "gpt" and code_vectors(tokenizer).shape[0] == model.vocab_size
    with pytest.raises(dd.CheckpointError, match="tokenizer run .* is missing"):  # the recorded path is gone
        dd.load_teacher(moved / "teacher", "cpu", digest)
    with pytest.raises(dd.CheckpointError, match="changed since"):
        dd.load_teacher(moved / "teacher", "cpu", "0" * 64, tokenizer_path=str(moved / "fsq"))
