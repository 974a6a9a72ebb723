"""The decoder registry: names resolve to decoding/<name>.py, settings are validated, kinds are checked."""
import pytest
import torch

from decoding.registry import available, get_decoder
from decoding.sampling import SamplingConfig
from generators.gpt import GPT
from generators.var import VAR
from tokenizers.msvq import MultiScaleVQ


def test_ar_is_registered_and_applies_to_every_generator():
    assert "ar" in available() and "registry" not in available() and "sampling" not in available()
    dec = get_decoder("ar")
    assert dec.name == "ar" and set(dec.applies_to) == {"gpt", "var", "flowar"}


def test_unknown_decoder_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown decoding=sjdd; available: .*ar"):
        get_decoder("sjdd")


def test_misspelled_setting_is_an_error_listing_the_valid_ones():
    dec = get_decoder("ar")
    assert dec.parse_settings({"name": "ar", "use_cache": False}).use_cache is False
    with pytest.raises(ValueError, match=r"unknown decoding.use_cahce for decoding=ar; its settings are: use_cache"):
        dec.parse_settings({"name": "ar", "use_cahce": False})


def test_run_counts_forward_passes_and_restores_train_mode():
    model = GPT(16, 3, block_size=9, dim=16, depth=1, heads=2)
    model.train()
    tokens, stats = get_decoder("ar").run(model, torch.tensor([0, 2]), SamplingConfig(cfg_scale=2.0),
                                          torch.Generator().manual_seed(0))
    assert tokens.shape == (2, 9) and model.training
    assert stats["forward_passes"] == 9 and stats["tokens"] == 9  # one [cond; uncond] call per token
    _, naive = get_decoder("ar").run(model, torch.tensor([0]), None, None, settings={"use_cache": False})
    assert naive["forward_passes"] == 9


def test_var_counts_one_forward_per_scale_and_refuses_use_cache_false():
    torch.manual_seed(0)
    msvq = MultiScaleVQ(dim=8, codebook_size=16, scales=(1, 2, 3)).eval()
    model = VAR(16, 3, (1, 2, 3), code_dim=8, depth=1, width=16, heads=2)
    maps, stats = get_decoder("ar").run(model, torch.tensor([1]), SamplingConfig(cfg_scale=1.5), None, msvq)
    assert [m.shape[-1] for m in maps] == [1, 2, 3] and stats["forward_passes"] == 3 and stats["tokens"] == 14
    with pytest.raises(ValueError, match="use_cache=false applies to GPT"):
        get_decoder("ar").run(model, torch.tensor([1]), None, None, msvq, {"use_cache": False})


def test_a_decoder_refuses_a_generator_kind_it_does_not_apply_to():
    from decoding.registry import Decoder

    gpt_only = Decoder("gptonly", ("gpt",), get_decoder("ar").settings, get_decoder("ar").fn)
    model = VAR(16, 3, (1, 2), code_dim=8, depth=1, width=16, heads=2)
    with pytest.raises(ValueError, match=r"decoding=gptonly applies to gpt generators, not to this var run; "
                                         r"decoders for var: .*ar"):
        gpt_only.check_applies(model)


def test_compile_needs_the_cache():
    model = GPT(16, 3, block_size=4, dim=16, depth=1, heads=2)
    with pytest.raises(ValueError, match="compiles the cached one-token step: it needs use_cache=true"):
        get_decoder("ar").run(model, torch.tensor([0]), None, None, settings={"compile": True, "use_cache": False})


@pytest.mark.slow  # inductor generates and builds C++ for the step: about a minute on 2 loaded cores
def test_compiled_steps_give_the_eager_tokens_on_cpu(one_thread):
    """decoding.compile=true on CPU (inductor, no CUDA graphs): ar and sjd draw the eager tokens for a seed, count
    the same forward passes, and compile each step once (a recompile per call would fall back to eager)."""
    torch.manual_seed(0)
    model = GPT(64, 3, block_size=16, dim=64, depth=2, heads=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    cond = torch.tensor([0, 1, 2, 1])
    s = SamplingConfig(cfg_scale=2.0, top_k=20, top_p=0.9)
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            eager, e_stats = get_decoder("ar").run(model, cond, s, torch.Generator().manual_seed(3))
            for _ in range(2):  # the second call reuses the compiled step
                compiled, c_stats = get_decoder("ar").run(model, cond, s, torch.Generator().manual_seed(3),
                                                          settings={"compile": True})
                assert torch.equal(eager, compiled)
                assert c_stats["forward_passes"] == e_stats["forward_passes"] == 16
            torch._dynamo.reset()  # the window is another shape of the same step
            sjd = get_decoder("sjd")
            eager, e_stats = sjd.run(model, cond, s, torch.Generator().manual_seed(5), None, {"window": 5})
            for _ in range(2):
                compiled, c_stats = sjd.run(model, cond, s, torch.Generator().manual_seed(5), None,
                                            {"window": 5, "compile": True})
                assert torch.equal(eager, compiled)
                assert c_stats["forward_passes"] == e_stats["forward_passes"]
    finally:
        torch._dynamo.reset()


def _compiled_var_matches_eager(device: str):
    """decoding.compile=true for VAR: the eager maps for a seed, the same forward count, one graph per scale
    built on the first call and none on the second."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    msvq = MultiScaleVQ(dim=8, codebook_size=32, scales=(1, 2, 3, 4)).eval().to(device)
    with torch.no_grad():
        msvq.embedding.weight.normal_()
    model = VAR(32, 3, (1, 2, 3, 4), code_dim=8, depth=2, width=32, heads=2).to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    cond = torch.tensor([0, 1, 2], device=device)
    s = SamplingConfig(cfg_scale=1.5, top_k=20, top_p=0.9)
    ar = get_decoder("ar")
    try:
        eager, e_stats = ar.run(model, cond, s, torch.Generator(device).manual_seed(4), msvq)
        graphs = [counters["stats"]["unique_graphs"]]
        for _ in range(2):
            compiled, c_stats = ar.run(model, cond, s, torch.Generator(device).manual_seed(4), msvq, {"compile": True})
            graphs.append(counters["stats"]["unique_graphs"])
            assert all(torch.equal(a, b) for a, b in zip(eager, compiled))
            assert c_stats["forward_passes"] == e_stats["forward_passes"] == 4
        assert graphs[1] - graphs[0] >= 3 and graphs[2] == graphs[1]  # scales 1..3 compiled once, then reused
    finally:
        torch._dynamo.reset()


@pytest.mark.slow  # inductor builds C++ for each of the 3 stepped scales: about a minute on 2 loaded cores
def test_compiled_var_scales_give_the_eager_maps_on_cpu(one_thread):
    _compiled_var_matches_eager("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="decoding.compile captures CUDA graphs: needs CUDA")
def test_compiled_var_scales_give_the_eager_maps_on_cuda():
    _compiled_var_matches_eager("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="decoding.compile captures CUDA graphs: needs CUDA")
def test_compiled_decode_step_gives_the_eager_tokens():
    torch.manual_seed(0)
    model = GPT(64, 3, block_size=16, dim=64, depth=2, heads=2).cuda()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    cond = torch.tensor([0, 1, 2, 1], device="cuda")
    s = SamplingConfig(cfg_scale=2.0, top_k=20, top_p=0.9)
    eager, e_stats = get_decoder("ar").run(model, cond, s, torch.Generator("cuda").manual_seed(3))
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):  # one capture, replayed for every step
            for _ in range(2):  # the second call replays the captured graph
                compiled, c_stats = get_decoder("ar").run(model, cond, s, torch.Generator("cuda").manual_seed(3),
                                                          settings={"compile": True})
                assert torch.equal(eager, compiled)
                assert c_stats["forward_passes"] == e_stats["forward_passes"] == 16
    finally:
        torch._dynamo.reset()
