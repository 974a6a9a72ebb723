"""Official VAR and LlamaGen checkpoints imported into tokar reproduce the official outputs (../shared/golden/).

The golden files hold tiny official-layout models with random weights and what the official code computed on
fixed inputs (README.md there). Tolerances (README): indices and tokens exactly; latents and logits 1e-5; images
1e-4. Convs run on one thread here (the README's bit-exact setting; 2 threads move images by up to 1e-5).
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from decoding.ar import SamplingConfig, generate
from generators.module import decode_tokens
from tools.official import OfficialCheckpointError

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden"
pytestmark = pytest.mark.skipif(not (GOLDEN / "README.md").is_file(),
                                reason=f"the golden reference files are not there: {GOLDEN} (shared/ beside the repo)")

LATENT, LOGITS, IMAGE = 1e-5, 1e-5, 1e-4
SCALES = [1, 2, 3, 4]


def close(a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a.float() - b.float()).abs().max().item()
    assert err <= tol, f"max abs difference {err:.3g} > {tol:g}"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def golden(name: str) -> tuple[dict, dict]:
    """(official state_dict, recorded io tensors) of a golden model."""
    return load_file(str(GOLDEN / f"{name}.weights.safetensors")), load_file(str(GOLDEN / f"{name}.io.safetensors"))


@pytest.fixture(scope="module")
def var():
    """(tokenizer, VAR, vqvae io, transformer io, official states) imported from the golden VAR files."""
    from tools.var import import_var

    vae, io_a = golden("var_vqvae")
    tf, io_b = golden("var_transformer")
    tokenizer, generator, _, _ = import_var("var_vqvae", "var_transformer", vae_state=vae, var_state=tf)
    return tokenizer, generator, io_a, io_b, vae, tf


@pytest.fixture(scope="module")
def llamagen():
    """(tokenizer, GPT, vq io, gpt io, official states) imported from the golden LlamaGen files."""
    from tools.llamagen import import_llamagen

    vq, io_c = golden("llamagen_vq")
    gpt, io_d = golden("llamagen_gpt")
    tokenizer, generator, _, _ = import_llamagen("llamagen_vq", "llamagen_gpt", image_size=16, n_head=2,
                                                 vq_state=vq, gpt_state=gpt)
    return tokenizer, generator, io_c, io_d, vq, gpt


#################################################################################
#                         Every official key is loaded                          #
#################################################################################

def check_every_key(model, key_map: dict, official: dict, ignored: list[str]) -> None:
    """Each official tensor sits in its tokar key unchanged; nothing is left over but the ignored buffers."""
    state = model.state_dict()
    for key, offs in key_map.items():
        expected = torch.cat([official[o] for o in offs]) if len(offs) > 1 else official[offs[0]]
        assert torch.equal(state[key], expected), key
    used = {o for offs in key_map.values() for o in offs}
    left = [k for k in official if k not in used]
    assert all(any(re.fullmatch(p, k) for p in ignored) for k in left), left
    assert len(used) + len(left) == len(official)


def test_var_import_loads_every_key(var):
    from tools.var import var_key_map, vqvae_key_map

    tokenizer, generator, _, _, vae, tf = var
    check_every_key(tokenizer, vqvae_key_map(tokenizer, vae, "vae"), vae, [r"quantize\.ema_vocab_hit_SV"])
    check_every_key(generator, var_key_map(generator, tf), tf,
                    [r"lvl_1L", r"attn_bias_for_masking", r"blocks\.\d+\.attn\.zero_k_bias"])
    assert tokenizer.quantizer.scales == SCALES and generator.scales == tuple(SCALES)


def test_llamagen_import_loads_every_key(llamagen):
    from tools.llamagen import gpt_key_map, vq_key_map

    tokenizer, generator, _, _, vq, gpt = llamagen
    check_every_key(tokenizer, vq_key_map(tokenizer, vq, "vq"), vq, [r"quantize\.codebook_used"])
    check_every_key(generator, gpt_key_map(2), gpt, [])


#################################################################################
#                              A. VAR VQVAE                                     #
#################################################################################

def test_var_phi_selection_matches_official_ticks():
    """share_quant_resi=4: scale si uses argmin |tick - si/(K-1)| with numpy's ticks (near-ties at 10 scales)."""
    from tokenizers.msvq import MultiScaleVQ

    assert MultiScaleVQ(8, 16, scales=SCALES).phi_index == [0, 1, 2, 3]
    assert MultiScaleVQ(8, 16, scales=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16)).phi_index == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


@torch.no_grad()
def test_var_vqvae_latent_indices_and_fhat_per_scale(var):
    tokenizer, _, io, _, _, _ = var
    img = io["A.input.img_B3HW"]
    f = tokenizer.quant_conv(tokenizer.encoder(img))  # (B, Cvae, 4, 4)
    close(f, io["A.f_BChw"], LATENT)
    q = tokenizer.quantizer(f)
    for k, idx in enumerate(q.indices):
        assert torch.equal(idx.reshape(2, -1), io[f"A.idxBl.{k}"]), f"scale {k}"
        close(tokenizer.quantizer.embed(idx), io[f"A.ms_h_BChw.{k}"], LATENT)
        f_hat = tokenizer.quantizer.decode_indices(q.indices[:k + 1])  # (B, Cvae, 4, 4) after scales 0..k
        close(f_hat, io[f"A.fhat_from_f.{k}"], LATENT)
        close(f_hat, io[f"A.fhat_from_idx.{k}"], LATENT)
    close(q.quantized, io["A.fhat_from_f.3"], LATENT)
    assert torch.equal(torch.cat([i.reshape(2, -1) for i in tokenizer.encode(img)], 1), io["A.gt_BL"])


@torch.no_grad()
def test_var_vqvae_teacher_forcing_inputs(var):
    tokenizer, _, io, _, _, _ = var
    indices = [io[f"A.idxBl.{k}"].view(2, s, s) for k, s in enumerate(SCALES)]
    close(tokenizer.quantizer.teacher_inputs(indices), io["A.x_BLCv_wo_first_l"], LATENT)


@torch.no_grad()
def test_var_vqvae_images(var):
    tokenizer, _, io, _, _, _ = var
    indices = [io[f"A.idxBl.{k}"].view(2, s, s) for k, s in enumerate(SCALES)]
    for k in range(len(SCALES)):  # decoded from the partial sums
        close(tokenizer.decode(indices[:k + 1]).clamp(-1, 1), io[f"A.idxBl_to_img.per_scale.{k}"], IMAGE)
    close(tokenizer.decode(indices).clamp(-1, 1), io["A.idxBl_to_img.last"], IMAGE)
    close(tokenizer.decode_latent(io["A.fhat_from_idx.3"]), io["A.decoder_unclamped"], IMAGE)
    close(tokenizer.decode_latent(io["A.fhat_from_idx.3"]).clamp(-1, 1), io["A.fhat_to_img"], IMAGE)
    img = io["A.input.img_B3HW"]
    close(tokenizer.decode(tokenizer.encode(img)).clamp(-1, 1), io["A.img_to_reconstructed_img.last"], IMAGE)


#################################################################################
#                              B. VAR transformer                               #
#################################################################################

@torch.no_grad()
def test_var_teacher_forced_logits_cond_and_null(var):
    _, generator, _, io, _, _ = var
    x = io["B.input.x_BLCv_wo_first_l"]
    close(generator(io["B.input.gt_BL"], io["B.input.label_B"], x), io["B.forward.logits_BLV"], LOGITS)
    close(generator(None, io["B.input.label_B_null"], x), io["B.forward.logits_BLV_null"], LOGITS)


@torch.no_grad()
def test_var_greedy_generation_with_cfg_ramp(var):
    tokenizer, generator, _, io, _, _ = var
    labels = io["B.input.ar_label_B"]
    sampling = SamplingConfig(cfg_scale=1.5, top_k=1)  # the golden run: cfg 1.5, top_k 1 (greedy)
    indices, _ = generate(generator, labels, sampling, torch.Generator().manual_seed(123),
                          tokenizer=tokenizer.quantizer)
    for k, idx in enumerate(indices):
        assert torch.equal(idx.reshape(2, -1), io[f"B.ar.idx_Bl.{k}"]), f"scale {k}"
    close(tokenizer.quantizer.decode_indices(indices), io["B.ar.fhat"], LATENT)
    images = decode_tokens(generator, tokenizer, indices, {})  # clamped to [-1, 1]
    close(images, io["B.ar.fhat_to_img_clamped"], IMAGE)
    close((images + 1) / 2, io["B.ar.img"], IMAGE)
    # every scale's raw [cond; uncond] logits and the ramped CFG logits, recomputed by teacher forcing
    both = torch.cat([labels, torch.full_like(labels, generator.num_classes)])
    raw = generator(None, both, tokenizer.quantizer.teacher_inputs(indices).repeat(2, 1, 1))  # (2B, L, V)
    for k, (begin, end) in enumerate(generator.bounds):
        close(raw[:, begin:end], io[f"B.ar.logits_raw_cond_uncond.{k}"], LOGITS)
        t = 1.5 * k / (len(SCALES) - 1)
        close((1 + t) * raw[:2, begin:end] - t * raw[2:, begin:end], io[f"B.ar.logits_cfg.{k}"], LOGITS)


#################################################################################
#                              C. LlamaGen VQ                                   #
#################################################################################

@torch.no_grad()
def test_llamagen_vq_latent_indices_and_straight_through(llamagen):
    tokenizer, _, io, _, _, _ = llamagen
    z = tokenizer.quant_conv(tokenizer.encoder(io["C.input.img_B3HW"]))  # (B, 8, 8, 8) before l2-normalisation
    close(z, io["C.h_pre_quant"], LATENT)
    q = tokenizer.quantizer(z)
    assert torch.equal(q.indices.reshape(-1), io["C.encode.indices"])  # flat over (b, h, w)
    close(q.quantized, io["C.encode.quant"], LATENT)  # z + (z_q - z), not z_q
    indices = io["C.encode.indices"].view(2, 8, 8)
    close(tokenizer.quantizer.decode_indices(indices), io["C.get_codebook_entry"], LATENT)


@torch.no_grad()
def test_llamagen_vq_images(llamagen):
    tokenizer, _, io, _, _, _ = llamagen
    close(tokenizer(io["C.input.img_B3HW"])[0], io["C.forward.dec"], IMAGE)
    close(tokenizer.decode_latent(io["C.encode.quant"]), io["C.decode.from_quant"], IMAGE)
    close(tokenizer.decode(io["C.encode.indices"].view(2, 8, 8)), io["C.decode_code"], IMAGE)


#################################################################################
#                              D. LlamaGen GPT                                  #
#################################################################################

def test_llamagen_rope_table(llamagen):
    """Class row all zeros (cos = sin = 0), then (row, column) angles of the 4x4 grid, interleaved pairs."""
    _, generator, _, io, _, _ = llamagen
    close(generator.rope_cos, io["D.freqs_cis"][..., 0], 1e-6)
    close(generator.rope_sin, io["D.freqs_cis"][..., 1], 1e-6)


@torch.no_grad()
def test_llamagen_teacher_forced_logits(llamagen):
    _, generator, _, io, _, _ = llamagen
    tokens = io["D.forward_full.idx"]  # (B, 16): the input is [class, tokens[:, :15]] = D.input.idx
    assert torch.equal(tokens[:, :15], io["D.input.idx"])
    logits = generator(tokens, io["D.input.cond_idx"])  # (B, 16, V)
    close(logits, io["D.forward.logits"], LOGITS)
    close(logits, io["D.forward_full.logits"][:, :16], LOGITS)
    close(generator(tokens.int(), io["D.input.cond_idx"]), logits, 0.0)  # int32 tokens (LlamaGen's) work as well


@pytest.mark.parametrize("run,cfg_interval", [("gen", -1), ("gen_cfg_interval5", 5)])
@torch.no_grad()
def test_llamagen_greedy_generation(llamagen, run, cfg_interval):
    """cfg 2.0, greedy; with cfg_interval=5 tokens 0-6 are guided and 7-15 use the conditional logits alone."""
    _, generator, _, io, _, _ = llamagen
    labels = io["D.input.gen_cond"]
    sampling = SamplingConfig(cfg_scale=2.0, temperature=1.0, top_k=1, top_p=1.0, cfg_interval=cfg_interval)
    tokens, _ = generate(generator, labels, sampling, torch.Generator().manual_seed(0))
    assert torch.equal(tokens, io[f"D.{run}.tokens"].long())  # LlamaGen returns int32
    # the raw logits of every model call ([cond; uncond]) and the guided ones, by teacher forcing
    both = torch.cat([labels, torch.full_like(labels, generator.num_classes)])
    raw = generator(tokens.repeat(2, 1), both)  # (2B, 16, V)
    close(raw, io[f"D.{run}.model_logits_per_call"], LOGITS)
    guided = raw[2:] + 2.0 * (raw[:2] - raw[2:])
    if cfg_interval >= 0:
        guided[:, cfg_interval + 2:] = raw[:2, cfg_interval + 2:]
    close(guided, io[f"D.{run}.guided_logits_per_step"], LOGITS)


#################################################################################
#                         Options the importers set                             #
#################################################################################

@torch.no_grad()
def test_gqa_equals_full_attention_with_repeated_kv_heads():
    """kv_heads=2 of 4: the same as 4-head attention whose k/v rows repeat each kv head for its 2 query heads."""
    from generators.layers import Attention

    torch.manual_seed(0)
    gqa, full = Attention(32, 4, kv_heads=2), Attention(32, 4)
    q, k, v = gqa.qkv.weight.split([32, 16, 16])  # kv head j = rows [8j, 8j + 8)
    rep = lambda w: w.view(2, 1, 8, 32).expand(2, 2, 8, 32).reshape(32, 32)
    full.qkv.weight.copy_(torch.cat([q, rep(k), rep(v)]))
    full.proj.load_state_dict(gqa.proj.state_dict())
    x = torch.randn(2, 5, 32)
    close(gqa(x, is_causal=True), full(x, is_causal=True), 1e-6)


@torch.no_grad()
def test_gqa_gpt_cached_decoding_equals_the_full_forward():
    """A GQA GPT (the cache holds kv_heads heads) samples the same tokens with and without the KV cache."""
    from generators.gpt import GPT

    torch.manual_seed(0)
    model = GPT(vocab_size=32, num_classes=3, block_size=9, dim=32, depth=2, heads=4, kv_heads=2).eval()
    for p in model.parameters():
        p.normal_(0, 0.3)
    labels = torch.tensor([0, 2])
    runs = [generate(model, labels, SamplingConfig(cfg_scale=2.0, temperature=1.0),
                     torch.Generator().manual_seed(5), use_cache=c)[0] for c in (True, False)]
    assert torch.equal(*runs)


@torch.no_grad()
def test_llamagen_import_reads_gqa_from_wqkv_rows():
    """n_kv_head < n_head: wqkv holds (heads + 2 kv_heads) * head_dim rows; the import sets kv_heads from them."""
    from generators.gpt import GPT
    from tools.llamagen import gpt_key_map, import_llamagen

    vq, _ = golden("llamagen_vq")
    torch.manual_seed(0)
    source = GPT(64, 10, 16, dim=128, depth=2, heads=4, kv_heads=2, multiple_of=256, norm_eps=1e-5,
                 class_rope="zero").eval()
    state = {gpt_key_map(2)[k][0]: v for k, v in source.state_dict().items()}
    _, model, _, config = import_llamagen("vq", "gpt", image_size=16, n_head=4, vq_state=vq, gpt_state=state)
    assert config["generator"]["model"]["kv_heads"] == 2 and model.blocks[0].attn.kv_heads == 2
    tokens, labels = torch.randint(0, 64, (2, 16)), torch.tensor([3, 10])
    assert torch.equal(model(tokens, labels), source(tokens, labels))


@torch.no_grad()
def test_gpt_options_default_unchanged_and_zero_class_rope():
    """tokar's defaults (identity class rope, eps 1e-6, width rounded to 8) stay; class_rope='zero' zeroes the class
    slot's q and k, so the class position returns its own v whatever the class embedding's direction."""
    from generators.gpt import GPT

    plain = GPT(vocab_size=16, num_classes=3, block_size=4, dim=32, depth=1, heads=2)
    assert plain.rope_cos[0].eq(1).all() and plain.blocks[0].attn_norm.eps == 1e-6
    assert plain.blocks[0].ffn.w1.out_features == 88  # int(8 * 32 / 3) = 85 -> 88
    llama = GPT(vocab_size=16, num_classes=3, block_size=4, dim=32, depth=1, heads=2, class_rope="zero",
                multiple_of=256, norm_eps=1e-5)
    assert llama.rope_cos[0].eq(0).all() and llama.rope_sin[0].eq(0).all()
    assert llama.blocks[0].ffn.w1.out_features == 256 and llama.blocks[0].ffn_norm.eps == 1e-5


#################################################################################
#                     Bad checkpoints: clear errors                             #
#################################################################################

def test_import_errors_name_the_key():
    from tools.var import import_var

    vae, _ = golden("var_vqvae")
    tf, _ = golden("var_transformer")
    missing = {k: v for k, v in tf.items() if k != "blocks.1.attn.q_bias"}
    with pytest.raises(OfficialCheckpointError, match=r"missing key 'blocks\.1\.attn\.q_bias'"):
        import_var("vae", "var", vae_state=vae, var_state=missing)
    extra = dict(tf, **{"blocks.0.attn.k_bias": torch.zeros(128)})
    with pytest.raises(OfficialCheckpointError, match=r"unexpected key 'blocks\.0\.attn\.k_bias'"):
        import_var("vae", "var", vae_state=vae, var_state=extra)
    shape = dict(vae, **{"decoder.mid.attn_1.proj_out.weight": torch.zeros(128, 128, 3, 3)})
    with pytest.raises(OfficialCheckpointError, match=r"'decoder\.mid\.attn_1\.proj_out\.weight' has shape "
                                                      r"\(128, 128, 3, 3\).*needs \(128, 128, 1, 1\)"):
        import_var("vae", "var", vae_state=shape, var_state=tf)
    nonzero_k = dict(tf, **{"blocks.0.attn.zero_k_bias": torch.ones(128)})
    with pytest.raises(OfficialCheckpointError, match="zero_k_bias is not zero"):
        import_var("vae", "var", vae_state=vae, var_state=nonzero_k)


class Pickled:
    """An arbitrary class: unpickling it would run code from wherever it is defined."""


def test_read_state_dict_refuses_pickled_objects(tmp_path, capsys):
    from tools.import_checkpoint import main
    from tools.official import read_state_dict

    gpt, _ = golden("llamagen_gpt")
    path = tmp_path / "c2i.pt"
    torch.save({"model": gpt, "args": argparse.Namespace(gpt_model="GPT-B", hook=Pickled())}, path)
    with pytest.raises(OfficialCheckpointError, match="pickled Python objects"):
        read_state_dict(path)
    assert main(["llamagen", "--vq", str(path), "--gpt", str(path), "--out", str(tmp_path / "run")]) == 2
    assert "pickled Python objects" in capsys.readouterr().err and not (tmp_path / "run").exists()
    torch.save({"model": gpt, "steps": 10, "args": argparse.Namespace(gpt_model="GPT-B")}, path)  # a training ckpt
    assert read_state_dict(path).keys() == gpt.keys()
    torch.save({"model": {"w": torch.zeros(1), "step": 3}}, path)
    with pytest.raises(OfficialCheckpointError, match="'step' is a int, not a tensor"):
        read_state_dict(path)
    torch.save({"model": gpt, "steps": 10}, path)  # the released format loads
    assert read_state_dict(path).keys() == gpt.keys()


#################################################################################
#                  The command line on real-format files -> sampling            #
#################################################################################

@torch.no_grad()
def test_cli_imports_official_files_and_the_runs_sample(tmp_path, capsys):
    """VAR's plain .pth state_dicts and LlamaGen's {"model": state_dict} .pt files -> runs that sample.py's loader
    reads (hash link checked) and that reproduce the golden greedy samples; the demo defaults sample too."""
    from generators.module import sample_images, sampling_config
    from sample import load_generator
    from tools.import_checkpoint import main
    from tools.llamagen import SAMPLING as LLAMAGEN_SAMPLING
    from tools.var import SAMPLING as VAR_SAMPLING

    (vae, _), (tf, io_b) = golden("var_vqvae"), golden("var_transformer")
    (vq, _), (gpt, io_d) = golden("llamagen_vq"), golden("llamagen_gpt")
    torch.save(vae, tmp_path / "vae.pth")
    torch.save(tf, tmp_path / "var.pth")
    torch.save({"model": vq}, tmp_path / "vq.pt")
    torch.save({"model": gpt}, tmp_path / "gpt.pt")
    out_var, out_llama = tmp_path / "runs" / "var", tmp_path / "runs" / "llamagen"
    assert main(["var", "--vae", str(tmp_path / "vae.pth"), "--var", str(tmp_path / "var.pth"),
                 "--out", str(out_var)]) == 0
    assert main(["llamagen", "--vq", str(tmp_path / "vq.pt"), "--gpt", str(tmp_path / "gpt.pt"), "--image-size", "16",
                 "--n-head", "2", "--out", str(out_llama)]) == 0
    assert main(["var", "--vae", str(tmp_path / "vae.pth"), "--var", str(tmp_path / "var.pth"),
                 "--out", str(out_var)]) == 2  # no silent overwrite
    assert "already holds an imported run" in capsys.readouterr().err

    model, tokenizer, config = load_generator(out_var)
    assert config["generator"]["sampling"] == VAR_SAMPLING
    indices, _ = generate(model, io_b["B.input.ar_label_B"], SamplingConfig(cfg_scale=1.5, top_k=1),
                          tokenizer=tokenizer.quantizer)
    assert all(torch.equal(i.reshape(2, -1), io_b[f"B.ar.idx_Bl.{k}"]) for k, i in enumerate(indices))
    images, _ = sample_images(model, tokenizer, torch.tensor([1, 8]), sampling_config(config["generator"]["sampling"]),
                              config["tokens"], torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 64, 64) and images.abs().max() <= 1

    model, tokenizer, config = load_generator(out_llama)
    assert config["generator"]["sampling"] == LLAMAGEN_SAMPLING
    tokens, _ = generate(model, io_d["D.input.gen_cond"], SamplingConfig(cfg_scale=2.0, top_k=1))
    assert torch.equal(tokens, io_d["D.gen.tokens"].long())
    images, _ = sample_images(model, tokenizer, torch.tensor([1, 8]), sampling_config(config["generator"]["sampling"]),
                              config["tokens"], torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


@pytest.mark.slow
def test_sample_py_on_an_imported_run(tmp_path):
    """python sample.py ckpt=<imported run> writes a grid (the user's command, in a subprocess)."""
    from tests.conftest import run_entry
    from tools.var import import_var

    (vae, _), (tf, _) = golden("var_vqvae"), golden("var_transformer")
    import_var("vae.pth", "var.pth", tmp_path / "run", vae_state=vae, var_state=tf)
    out = tmp_path / "sample"
    proc = run_entry("sample.py", [f"ckpt={tmp_path / 'run'}", "classes=[1,8]", "samples_per_class=2", "device=cpu",
                                   f"hydra.run.dir={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "grid.png").is_file() and (out / "metrics.json").is_file()
