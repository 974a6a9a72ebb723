"""Codebook neighbourhoods (decoding/neighbours.py): brute-force agreement with ties, the on-disk cache keyed by the
tokenizer's hash, and the K = 65,536 size."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from utils.runs import load_run, run_hash
from decoding import neighbours
from decoding.neighbours import cache_file, codebook_neighbours, knn_codes
from tokenizers.fsq import FSQ
from utils.checkpoint import export_run


def brute_force(vectors: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact pairwise L2 (no matmul trick, float64), self excluded, stable argsort: ties go to the smaller index."""
    d = torch.cdist(vectors.double(), vectors.double(), compute_mode="donot_use_mm_for_euclid_dist")
    d.fill_diagonal_(float("inf"))
    order = torch.argsort(d, dim=1, stable=True)[:, :k]
    return order, d.gather(1, order).float()


CODEBOOKS = {
    "grid_with_duplicates": lambda: torch.randint(0, 3, (60, 2), generator=torch.Generator().manual_seed(0)).float(),
    "fsq_3x4x5": lambda: FSQ([3, 4, 5]).codebook_vectors(),  # levels 3, 4, 5: steps of 1, 1/2, 1/2 -> many ties
    "random": lambda: torch.randn(300, 5, generator=torch.Generator().manual_seed(1)),
}


@pytest.mark.parametrize("max_block", [1, 50, 1 << 22])  # one row per block, blocks that split rows oddly, one block
@pytest.mark.parametrize("name", sorted(CODEBOOKS))
def test_knn_agrees_with_brute_force_including_ties(name, max_block):
    vectors = CODEBOOKS[name]()
    n = vectors.shape[0]
    for k in (1, 4, 9, n - 1):
        got_idx, got_dist = knn_codes(vectors, k, max_block=max_block)
        want_idx, want_dist = brute_force(vectors, k)
        assert got_idx.shape == (n, k) and got_idx.dtype == torch.int64 and got_dist.dtype == torch.float32
        assert torch.equal(got_idx, want_idx), (name, k, (got_idx != want_idx).nonzero()[:3].tolist())
        torch.testing.assert_close(got_dist, want_dist, atol=1e-5, rtol=1e-5)
    # the case the test is about: the grid has codes at equal distances, and duplicates at distance 0
    if name == "grid_with_duplicates":
        idx, dist = knn_codes(vectors, 4, max_block=max_block)
        assert (dist[:, 0] == 0).any() and (dist[:, 1:] == dist[:, :-1]).any()
        assert (idx != torch.arange(n)[:, None]).all()


def test_knn_by_hand_on_a_line():
    v = torch.tensor([[0.0], [1.0], [2.0], [4.0]])
    idx, dist = knn_codes(v, 2)
    # code 1 is 1 away from both 0 and 2: the smaller index first
    assert idx.tolist() == [[1, 2], [0, 2], [1, 0], [2, 1]]
    torch.testing.assert_close(dist, torch.tensor([[1.0, 2.0], [1.0, 1.0], [1.0, 2.0], [2.0, 3.0]]))
    assert knn_codes(v, 0)[0].shape == (4, 0)
    with pytest.raises(ValueError, match="0 <= k <= 3"):
        knn_codes(v, 4)


# ------------------------------------------------------------------------------------------------
# The cache beside the tokenizer run
# ------------------------------------------------------------------------------------------------

AUTOENCODER = {"ch": 8, "ch_mult": [1, 2], "z_channels": 8, "quant_conv_kernel": 1}


def make_vq_run(path: Path, seed: int) -> Path:
    """An untrained VQ tokenizer (K = 32) exported as a finished run; the seed sets its codebook."""
    from tokenizers.module import build_tokenizer

    config = {"kind": "tokenizer",
              "tokenizer": {"name": "vq", "autoencoder": AUTOENCODER,
                            "quantizer": {"_target_": "tokenizers.vq.VQ", "dim": 4, "codebook_size": 32}},
              "data": {"name": "synthetic", "image_size": 16, "channels": 1, "num_classes": 4}}
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(config["tokenizer"], 1)
    with torch.no_grad():
        tokenizer.quantizer.embed.normal_()
    export_run(tokenizer, config, path, kind="tokenizer")
    return path


def test_cache_is_reused_and_rebuilt_when_the_tokenizer_changes(tmp_path, monkeypatch):
    run = make_vq_run(tmp_path / "run", seed=0)
    calls = []
    real_knn = neighbours.knn_codes
    monkeypatch.setattr(neighbours, "knn_codes", lambda *a, **kw: calls.append(1) or real_knn(*a, **kw))

    idx, dist = codebook_neighbours(run, 5)
    vectors = load_run(run, "tokenizer").model.quantizer.codebook_vectors()
    want_idx, want_dist = brute_force(vectors, 5)
    assert torch.equal(idx, want_idx) and torch.allclose(dist, want_dist, atol=1e-5) and len(calls) == 1
    path = cache_file(run, 5)
    assert path == run / "neighbours_k5.safetensors" and path.is_file()
    assert not list(run.glob(".*.tmp"))  # the atomic write left no temp file
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["tokenizer_hash"] == run_hash(run) and f.metadata()["k"] == "5"

    again = codebook_neighbours(run, 5)  # same tokenizer: read back, not recomputed
    assert len(calls) == 1 and torch.equal(again[0], idx) and torch.equal(again[1], dist)
    loaded = load_run(run, "tokenizer")  # a loaded run is accepted as well, and hits the same file
    assert torch.equal(codebook_neighbours(loaded, 5)[0], idx) and len(calls) == 1
    codebook_neighbours(run, 3)  # another k is another file
    assert len(calls) == 2 and cache_file(run, 3).is_file()

    make_vq_run(run, seed=1)  # the tokenizer is retrained in place: new weights, new hash
    rebuilt_idx, _ = codebook_neighbours(run, 5)
    assert len(calls) == 3
    new_vectors = load_run(run, "tokenizer").model.quantizer.codebook_vectors()
    assert torch.equal(rebuilt_idx, brute_force(new_vectors, 5)[0]) and not torch.equal(rebuilt_idx, idx)
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["tokenizer_hash"] == run_hash(run)


def test_continuous_tokenizer_has_no_neighbours(tmp_path):
    from tokenizers.module import build_tokenizer

    config = {"kind": "tokenizer", "tokenizer": {"name": "kl", "autoencoder": AUTOENCODER,
                                                 "quantizer": {"_target_": "tokenizers.kl.KLGaussian", "dim": 4}},
              "data": {"name": "synthetic", "image_size": 16, "channels": 1, "num_classes": 4}}
    export_run(build_tokenizer(config["tokenizer"], 1), config, tmp_path / "kl", kind="tokenizer")
    with pytest.raises(ValueError, match="continuous"):
        codebook_neighbours(tmp_path / "kl", 4)


@pytest.mark.slow
def test_65536_codes_in_six_dimensions():
    """K = 65,536, d = 6, k = 10: 12.9 s of CPU on one thread (76 s of wall time on the shared, loaded 2-core test
    machine, hence slow); rows spot-checked against brute force."""
    vectors = torch.randn(65536, 6, generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    idx, _ = knn_codes(vectors, 10)
    elapsed = time.perf_counter() - started
    assert idx.shape == (65536, 10) and elapsed < 600
    rows = torch.tensor([0, 1, 4097, 65535])
    d = torch.cdist(vectors[rows].double(), vectors.double(), compute_mode="donot_use_mm_for_euclid_dist")
    d[torch.arange(4), rows] = float("inf")
    assert torch.equal(idx[rows], torch.argsort(d, dim=1, stable=True)[:, :10])
