"""Import the official VAR checkpoints (FoundationVision/VAR: ``vae_ch160v4096z32.pth`` + ``var_d{16,20,24,30}.pth``).

The VQVAE becomes a tokar tokenizer run (taming autoencoder + ``MultiScaleVQ``), the transformer a tokar VAR
run. Architecture and size come from the tensors' shapes; the scales from the transformer's ``lvl_1L`` buffer.
Facts: ../shared/golden/README.md, sections A and B.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from tools.official import (
    OfficialCheckpointError,
    autoencoder_map,
    config_node,
    imagenet_data,
    indices_under,
    read_state_dict,
    remap,
    require,
    write_runs,
)

# VAR's FID settings (README / reference/generators.md); its demo notebook uses cfg 4, top_p 0.95
SAMPLING = {"cfg_scale": 1.5, "temperature": 1.0, "top_k": 900, "top_p": 0.96}


#################################################################################
#                                   VQVAE                                       #
#################################################################################

def vqvae_config(state: dict, scales, source, using_znorm: bool = False, quant_resi: float = 0.5) -> dict:
    """The tokar tokenizer node (name, quantizer, autoencoder) of a VAR VQVAE state_dict."""
    ch = require(state, "encoder.conv_in.weight", source).shape[0]
    levels = indices_under(state, "encoder.down")
    if not levels:
        raise OfficialCheckpointError(f"{source}: no encoder.down.* keys; not a VAR VQVAE state_dict")
    ch_mult = [require(state, f"encoder.down.{i}.block.0.conv1.weight", source).shape[0] // ch for i in levels]
    attn = [i for i in levels if f"encoder.down.{i}.attn.0.qkv.weight" in state]
    dec_attn = [i for i in indices_under(state, "decoder.up") if f"decoder.up.{i}.attn.0.qkv.weight" in state]
    if attn != dec_attn:
        raise OfficialCheckpointError(f"{source}: attention at encoder levels {attn} but decoder levels {dec_attn}; "
                                      "tokar's autoencoder needs the same levels")
    codebook = require(state, "quantize.embedding.weight", source)
    quant_conv = require(state, "quant_conv.weight", source)
    return {
        "name": "var_vqvae",
        "quantizer": {"_target_": "tokenizers.msvq.MultiScaleVQ", "dim": int(codebook.shape[1]),
                      "codebook_size": int(codebook.shape[0]), "scales": [int(s) for s in scales], "beta": 0.25,
                      "quant_resi": quant_resi, "share_quant_resi": phi_count(state, source),
                      "l2_norm": bool(using_znorm)},
        "autoencoder": {"ch": int(ch), "ch_mult": ch_mult,
                        "num_res_blocks": len(indices_under(state, "encoder.down.0.block")),
                        "z_channels": int(require(state, "encoder.conv_out.weight", source).shape[0]), "dropout": 0.0,
                        "quant_conv_kernel": int(quant_conv.shape[-1]), "attn_levels": attn,
                        "mid_attn": "encoder.mid.attn_1.qkv.weight" in state, "downsample_pad": "asymmetric",
                        "decoder_res_blocks": len(indices_under(state, "decoder.up.0.block"))},
    }


def phi_count(state: dict, source) -> int:
    """VAR's share_quant_resi from the phi keys: 4 partially shared (qresi_ls.k), 1 shared (qresi), 0 one per scale."""
    if "quantize.quant_resi.qresi.weight" in state:
        return 1
    shared = indices_under(state, "quantize.quant_resi.qresi_ls")
    if shared:
        return len(shared)
    if indices_under(state, "quantize.quant_resi"):
        return 0
    raise OfficialCheckpointError(f"{source}: no quantize.quant_resi.* keys (the phi convs); not a VAR VQVAE, or one "
                                  "with quant_resi=0, which tokar does not import")


def phi_keys(state: dict, k: int) -> str:
    """The official prefix of phi k."""
    for prefix in ("quantize.quant_resi.qresi", f"quantize.quant_resi.qresi_ls.{k}", f"quantize.quant_resi.{k}"):
        if f"{prefix}.weight" in state:
            return prefix
    return f"quantize.quant_resi.qresi_ls.{k}"


def vqvae_key_map(tokenizer, state: dict, source) -> dict:
    """{tokar key: (official key, ...)} of a VAR VQVAE."""
    cfg_levels = indices_under(state, "encoder.down")
    last, nrb = cfg_levels[-1], len(indices_under(state, "encoder.down.0.block"))
    dec_nrb = len(indices_under(state, "decoder.up.0.block"))
    attn = {i for i in cfg_levels if f"encoder.down.{i}.attn.0.qkv.weight" in state}
    mid = ["mid.block_1", "mid.attn_1", "mid.block_2"] if "encoder.mid.attn_1.qkv.weight" in state else ["mid.block_1"]
    enc = ["conv_in"]
    for i in cfg_levels:
        for j in range(nrb):
            enc += [f"down.{i}.block.{j}"] + ([f"down.{i}.attn.{j}"] if i in attn else [])
        if i != last:
            enc.append(f"down.{i}.downsample.conv")
    enc += mid + ["norm_out", "conv_out"]
    dec = ["conv_in"] + mid
    for i in reversed(cfg_levels):  # decoder.up.{i} is level i; the lowest resolution runs first
        for j in range(dec_nrb):
            dec += [f"up.{i}.block.{j}"] + ([f"up.{i}.attn.{j}"] if i in attn else [])
        if i != 0:
            dec.append(f"up.{i}.upsample.conv")
    dec += ["norm_out", "conv_out"]
    key_map = autoencoder_map(tokenizer, enc, dec, state, source)
    for name in ("quant_conv", "post_quant_conv"):
        key_map.update({f"{name}.{p}": (f"{name}.{p}",) for p in ("weight", "bias")})
    key_map["quantizer.embedding.weight"] = ("quantize.embedding.weight",)
    for k in range(len(tokenizer.quantizer.phis)):
        prefix = phi_keys(state, k)
        key_map.update({f"quantizer.phis.{k}.conv.{p}": (f"{prefix}.{p}",) for p in ("weight", "bias")})
    return key_map


#################################################################################
#                                 Transformer                                   #
#################################################################################

def scales_from_levels(state: dict, source) -> list[int]:
    """VAR's patch_nums from the lvl_1L buffer (the scale index of every token): [sqrt(count of level k)]."""
    lvl = require(state, "lvl_1L", source).reshape(-1)
    counts = torch.bincount(lvl).tolist()
    scales = [math.isqrt(c) for c in counts]
    if any(s * s != c for s, c in zip(scales, counts)) or lvl.tolist() != sorted(lvl.tolist()):
        raise OfficialCheckpointError(f"{source}: lvl_1L {lvl.tolist()[:20]}... is not VAR's level layout "
                                      "(each scale's pn*pn tokens in order)")
    return scales


def var_config(state: dict, source) -> dict:
    """The tokar generator model node (with _target_) of a VAR transformer state_dict."""
    if "shared_ada_lin.1.weight" in state:
        raise OfficialCheckpointError(f"{source}: shared AdaLN (shared_aln=True, e.g. VAR-d36-s) is not supported")
    width = require(state, "class_emb.weight", source).shape[1]
    depth = len(indices_under(state, "blocks"))
    scale_mul = state.get("blocks.0.attn.scale_mul_1H11")
    heads = int(scale_mul.shape[1]) if scale_mul is not None else depth  # VAR's rule heads = depth
    hidden = require(state, "blocks.0.ffn.fc1.weight", source).shape[0]
    return {"_target_": "generators.var.VAR", "depth": depth, "width": int(width), "heads": heads,
            "mlp_ratio": hidden / width, "class_dropout": 0.1, "attn_l2_norm": scale_mul is not None,
            "drop_path": 0.0, "zero_k_bias": True}


def var_key_map(model, state: dict) -> dict:
    """{tokar key: (official key,)} of a VAR transformer (names differ only in a few places)."""
    rename = {"pos_embed": "pos_1LC", "attn.qkv.weight": "attn.mat_qkv.weight", "attn.log_scale": "attn.scale_mul_1H11"}
    out = {}
    for key in model.state_dict():
        off = key
        for tok, official in rename.items():
            if key == tok or key.endswith("." + tok):
                off = key[: len(key) - len(tok)] + official
        out[key] = (off,)
    return out


def check_buffers(model, state: dict, source) -> None:
    """The official buffers tokar recomputes must hold what tokar computes (else outputs would differ silently)."""
    mask = torch.zeros(model.attn_mask.shape).masked_fill(~model.attn_mask, float("-inf"))
    bias = state.get("attn_bias_for_masking")
    if bias is not None and not torch.equal(bias.reshape(mask.shape), mask):
        raise OfficialCheckpointError(f"{source}: attn_bias_for_masking is not the block-causal mask of scales "
                                      f"{list(model.scales)}")
    for i in range(model.depth):
        zk = state.get(f"blocks.{i}.attn.zero_k_bias")
        if zk is not None and bool(zk.abs().max() > 0):
            raise OfficialCheckpointError(f"{source}: blocks.{i}.attn.zero_k_bias is not zero; tokar's VAR keeps the "
                                          "k bias at zero as the official model does")


#################################################################################
#                                    Import                                     #
#################################################################################

def import_var(vae_path: str | Path, var_path: str | Path, out: str | Path | None = None, scales=None,
               using_znorm: bool = False, overwrite: bool = False, vae_state: dict | None = None,
               var_state: dict | None = None):
    """Official VQVAE + VAR checkpoints -> (tokenizer, generator, tokenizer config, generator config).

    With ``out`` the two runs are written (<out>/tokenizer, <out>). ``vae_state`` / ``var_state`` skip reading the
    files (tests pass the golden state_dicts); the paths then only label messages.
    """
    from generators.module import build_generator, model_args
    from tokenizers.module import build_tokenizer

    vae = vae_state if vae_state is not None else read_state_dict(vae_path)
    var = var_state if var_state is not None else read_state_dict(var_path)
    scales = [int(s) for s in scales] if scales else scales_from_levels(var, var_path)
    # 1. the tokenizer run
    node = {**config_node("_shared", "autoencoder"), **vqvae_config(vae, scales, vae_path, using_znorm)}
    node["autoencoder"] = {**config_node("_shared", "autoencoder")["autoencoder"], **node["autoencoder"]}
    tokenizer = build_tokenizer(node, 3)
    image_size = tokenizer.downsample * scales[-1]
    num_classes = require(var, "class_emb.weight", var_path).shape[0] - 1
    data = imagenet_data(image_size, num_classes)
    source = {"format": "var", "vae": str(vae_path), "var": str(var_path)}
    tok_config = {"kind": "tokenizer", "tokenizer": node, "data": data, "total_steps": 0, "source": source}
    remap(vae, vqvae_key_map(tokenizer, vae, vae_path), tokenizer, vae_path,
          ignored=[r"quantize\.ema_vocab_hit_SV"], tokar_only=[])
    # 2. the generator run
    gen_node = config_node("generator", "var")
    gen_node.update(model=var_config(var, var_path), sampling=dict(SAMPLING))
    gen_config = {"kind": "generator", "generator": gen_node, "data": data,
                  "tokens": {"layout": "multiscale", "token_shape": [[s, s] for s in scales], "scale_factor": 1.0,
                             "cache": {}},
                  "model_args": model_args("var", tokenizer, image_size, num_classes, gen_node["model"]),
                  "total_steps": 0, "source": source}
    generator = build_generator(gen_config)
    check_buffers(generator, var, var_path)
    remap(var, var_key_map(generator, var), generator, var_path,
          ignored=[r"lvl_1L", r"attn_bias_for_masking", r"blocks\.\d+\.attn\.zero_k_bias"])
    tokenizer.eval()
    generator.eval()
    if out is not None:
        write_runs(out, tokenizer, tok_config, generator, gen_config, overwrite)
    return tokenizer, generator, tok_config, gen_config
