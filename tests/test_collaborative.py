"""Collaborative decoding (CoDe) for VAR and its fine-tuning objectives: identities, prefill, errors, losses."""
import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from decoding.registry import get_decoder
from decoding.sampling import SamplingConfig
from generators.objective import TokenObjective, token_loss
from generators.var import VAR
from tokenizers.msvq import MultiScaleVQ
from utils.checkpoint import CheckpointError
from utils.runs import check_same_tokenizer

V, NC, SCALES = 16, 4, (1, 2, 3, 4)  # K = 4, L = 30


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def msvq():
    torch.manual_seed(1)
    q = MultiScaleVQ(dim=8, codebook_size=V, scales=SCALES)
    with torch.no_grad():
        q.embedding.weight.normal_()
    return q.eval()


def var(seed, depth=2):
    torch.manual_seed(seed)
    model = VAR(V, NC, SCALES, code_dim=8, depth=depth, width=32, heads=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def code(model, refiner, n, **kw):
    settings = get_decoder("collaborative").parse_settings(dict(drafting_steps=n, **kw))
    settings.refiner = refiner
    return settings


def run(model, settings, sampling, seed, msvq, cond):
    return get_decoder("collaborative").run(model, cond, sampling, torch.Generator().manual_seed(seed), msvq, settings)


def flat(maps):
    return torch.cat([m.flatten(1) for m in maps], 1)


SAMPLE = SamplingConfig(cfg_scale=1.5, temperature=1.0, top_k=8, top_p=0.95)
STAGE_DEFAULTS = dict(drafter_temperature=None, refiner_temperature=None)  # both stages use SAMPLE


def test_all_scales_drafted_is_the_drafters_ar(msvq):
    drafter, refiner, cond = var(0), var(1), torch.tensor([0, 1, 2, 3])
    ref, _ = get_decoder("ar").run(drafter, cond, SAMPLE, torch.Generator().manual_seed(7), msvq)
    out, stats = run(drafter, code(drafter, refiner, len(SCALES), **STAGE_DEFAULTS), SAMPLE, 7, msvq, cond)
    assert torch.equal(flat(out), flat(ref))
    assert stats["refiner_forward_passes"] == 0 and stats["drafter_forward_passes"] == len(SCALES)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_same_weights_give_plain_var_tokens(msvq, n):
    """Drafter == refiner: greedy and sampled tokens equal plain VAR's for the same seed (one RNG stream)."""
    drafter, cond = var(0), torch.tensor([0, 1, 2, 3, 1])
    refiner = copy.deepcopy(drafter)
    for sampling in (SamplingConfig(cfg_scale=1.5, temperature=0.0), SAMPLE):
        ref, _ = get_decoder("ar").run(drafter, cond, sampling, torch.Generator().manual_seed(3), msvq)
        out, stats = run(drafter, code(drafter, refiner, n, **STAGE_DEFAULTS), sampling, 3, msvq, cond)
        assert torch.equal(flat(out), flat(ref))
        assert stats["drafter_forward_passes"] == n and stats["refiner_forward_passes"] == len(SCALES) - n
        assert stats["forward_passes"] == len(SCALES)


def test_different_refiner_changes_only_the_refined_scales(msvq):
    drafter, refiner, cond = var(0), var(1), torch.tensor([0, 1, 2, 3])
    ref, _ = get_decoder("ar").run(drafter, cond, SAMPLE, torch.Generator().manual_seed(5), msvq)
    out, _ = run(drafter, code(drafter, refiner, 2, **STAGE_DEFAULTS), SAMPLE, 5, msvq, cond)
    assert all(torch.equal(a, b) for a, b in zip(out[:2], ref[:2]))  # the drafter's scales
    assert not torch.equal(flat(out[2:]), flat(ref[2:]))  # the refiner's differ


def test_refiner_prefill_logits_equal_incremental_decoding(msvq):
    refiner, cond = var(1), torch.tensor([0, 3])
    idx = [torch.randint(0, V, (2, s, s)) for s in SCALES]
    labels = refiner.class_emb.with_null(cond)
    with torch.no_grad():
        refiner.setup_cache(4)
        prefilled, _ = refiner.prefill_scales(labels, idx[:2], msvq)  # scales 0..2 in one pass -> scale 2
        inputs = msvq.teacher_inputs(idx).repeat(2, 1, 1)  # (4, 29, 8)
        refiner.setup_cache(4)
        refiner.prefill(labels)
        refiner.step(inputs[:, :4], 1)
        incremental = refiner.step(inputs[:, 4:13], 2)  # (4, 9, V)
    assert torch.allclose(prefilled, incremental, atol=1e-4)


def test_stage_settings_apply_to_their_scales(msvq):
    """A greedy refiner after a sampled drafter: the refined scales are the refiner's argmax."""
    drafter, cond = var(0), torch.tensor([1, 2])
    refiner = copy.deepcopy(drafter)
    out, _ = run(drafter, code(drafter, refiner, 2, drafter_temperature=1.0, refiner_temperature=0.0), SAMPLE, 1,
                 msvq, cond)
    greedy_tail = drafter.generate(msvq, cond, 1.5, 0.0, 8, 0.95, None, indices_prefix=out[:2])
    assert torch.equal(flat(out), flat(greedy_tail))


def test_bad_settings_are_clear_errors(msvq):
    drafter, refiner, cond = var(0), var(1), torch.tensor([0])
    with pytest.raises(ValueError, match="drafting_steps=0"):
        code(drafter, refiner, 0)
    with pytest.raises(ValueError, match=r"drafting_steps=5 but the VAR has 4 scales: choose 1..4"):
        run(drafter, code(drafter, refiner, 5), SAMPLE, 0, msvq, cond)
    with pytest.raises(ValueError, match="refiner is not loaded"):
        run(drafter, code(drafter, None, 2), SAMPLE, 0, msvq, cond)
    with pytest.raises(ValueError, match="needs the small VAR: decoding.refiner_ckpt"):
        get_decoder("collaborative").prepare({"drafting_steps": 2}, {}, "cpu")
    with pytest.raises(ValueError, match="unknown decoding.drafting_step for decoding=collaborative"):
        get_decoder("collaborative").parse_settings({"drafting_step": 2})


def test_runs_must_share_tokenizer_and_dataset():
    data = {"name": "fashion_mnist", "image_size": 32, "num_classes": 10, "settings": {}}
    a = {"tokenizer": {"hash": "aaa", "path": "runs/tok1"}, "data": data}
    b = {"tokenizer": {"hash": "bbb", "path": "runs/tok2"}, "data": data}
    c = {"tokenizer": {"hash": "aaa", "path": "runs/tok1"}, "data": {**data, "name": "cifar10"}}
    check_same_tokenizer(a, dict(a), "the refiner", "drafter", "refiner")
    with pytest.raises(CheckpointError, match=r"the refiner refiner was trained on tokenizer bbb \(runs/tok2\), but "
                                              r"drafter on aaa \(runs/tok1\)"):
        check_same_tokenizer(a, b, "the refiner", "drafter", "refiner")
    with pytest.raises(CheckpointError, match="trained on cifar10"):
        check_same_tokenizer(a, c, "the refiner", "drafter", "refiner")


# -- fine-tuning objectives ---------------------------------------------------------------------------

def test_distillation_loss_is_zero_for_student_equal_teacher_and_matches_kl_by_hand():
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    obj = TokenObjective(temperature=2.0, kl_weight=1.0, ce_weight=0.0)
    loss, _ = token_loss(logits, targets, obj, logits.clone())
    assert abs(loss.item()) < 1e-6
    teacher = torch.randn(2, 5, 7)
    loss, _ = token_loss(logits, targets, obj, teacher)
    p, q = F.softmax(teacher / 2, -1), F.softmax(logits / 2, -1)
    by_hand = (p * (p.log() - q.log())).sum(-1).mean() * 4
    assert math.isclose(loss.item(), by_hand.item(), rel_tol=1e-5)
    obj.ce_weight = 0.5
    loss2, _ = token_loss(logits, targets, obj, teacher)
    assert math.isclose(loss2.item(), by_hand.item() + 0.5 * F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item(),
                        rel_tol=1e-5)


def test_train_scales_mask_exactly_the_configured_scales(msvq):
    model = var(0)
    pos = model.scale_positions([0, -1])  # scale 0 and the last scale
    assert pos.tolist() == [True] + [False] * (4 + 9) + [True] * 16
    logits = torch.randn(2, 30, V, requires_grad=True)
    targets = torch.randint(0, V, (2, 30))
    loss, _ = token_loss(logits, targets, TokenObjective(positions=pos))
    loss.backward()
    touched = logits.grad.abs().sum((0, 2)) > 0  # (30,)
    assert torch.equal(touched, pos)
    keep = pos.nonzero().squeeze(1)
    by_hand = F.cross_entropy(logits[:, keep].flatten(0, 1), targets[:, keep].flatten())
    assert math.isclose(loss.item(), by_hand.item(), rel_tol=1e-6)
    with pytest.raises(ValueError, match="outside the 4 scales"):
        model.scale_positions([4])


def test_var_distillation_from_itself_is_zero_and_sees_the_same_dropped_labels(msvq):
    student = var(0)
    student.class_dropout = student.class_emb.dropout = 0.5
    teacher = copy.deepcopy(student).eval()
    student.train()
    idx = [torch.randint(0, V, (6, s, s)) for s in SCALES]
    codes = torch.cat([m.flatten(1) for m in idx], 1)
    obj = TokenObjective(teacher=teacher, temperature=1.0, kl_weight=1.0, ce_weight=0.0)
    torch.manual_seed(0)
    loss, _ = student.loss(codes, torch.arange(6) % NC, SimpleNamespace(quantizer=msvq), obj)
    assert abs(loss.item()) < 1e-5  # label dropout drew null labels for some rows: the teacher saw them too


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="Linux /proc only")
def test_cpu_peak_memory_is_the_peak_since_the_reset():
    """A 256 MiB buffer freed before the reset is not in the peak; the same buffer after the reset is."""
    from decoding.collaborative import peak_memory_mb, reset_peak_memory

    cpu = torch.device("cpu")
    big = torch.ones(64 * 2 ** 20)  # 256 MiB, touched
    del big
    reset_peak_memory(cpu)
    before = peak_memory_mb(cpu)
    big = torch.ones(64 * 2 ** 20)
    after = peak_memory_mb(cpu)
    del big
    reset_peak_memory(cpu)
    assert after - before > 200  # the buffer made after the reset counts
    assert peak_memory_mb(cpu) < after - 200  # and a reset after freeing it forgets it (negative control)


def test_cpu_peak_memory_after_keep_freed_memory():
    """With sample.py's heap setting the freed pages stay with the process; the reset hands them back first,
    so the peak still counts only what sampling allocates after it (fresh interpreter: the setting is global)."""
    import subprocess
    import sys
    from pathlib import Path

    script = ("import torch\nfrom utils.heap import keep_freed_memory\n"
              "from decoding.collaborative import peak_memory_mb, reset_peak_memory\n"
              "keep_freed_memory()\ncpu = torch.device('cpu')\n"
              "big = torch.ones(64 * 2 ** 20); del big\nreset_peak_memory(cpu); before = peak_memory_mb(cpu)\n"
              "big = torch.ones(64 * 2 ** 20); after = peak_memory_mb(cpu); del big\n"
              "reset_peak_memory(cpu)\nprint(after - before, after - peak_memory_mb(cpu))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         cwd=str(Path(__file__).parents[1]))
    grown, released = map(float, out.stdout.split())
    assert grown > 200 and released > 200  # 256 MiB counted after the reset, and forgotten after the next one
