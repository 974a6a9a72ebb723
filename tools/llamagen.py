"""Import the official LlamaGen class-conditional checkpoints (FoundationVision/LlamaGen: ``vq_ds16_c2i.pt`` +
``c2i_{B,L,XL,XXL,3B}_{256,384}.pt``, each {"model": state_dict}).

The VQ model becomes a tokar tokenizer run (taming autoencoder + ``VQ`` with the l2-normalised codebook), the
GPT a tokar GPT run (RMSNorm eps 1e-5, SwiGLU rounded to 256, zero class RoPE row, GQA when n_kv_head is set).
Widths come from the tensors' shapes. Two things the weights cannot tell: the head count (LlamaGen's sizes have
head_dim 64 except 3B; ``n_head`` overrides) and the image size (256 or 384; the token grid follows from it).
Facts: ../shared/golden/README.md, sections C and D.
"""
from __future__ import annotations

from pathlib import Path

from generators.layers import swiglu_hidden
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

# the official c2i demo (autoregressive/sample/sample_c2i.py); its FID runs use cfg 2.0 (B, L), 1.75 (XL, XXL)
SAMPLING = {"cfg_scale": 4.0, "temperature": 1.0, "top_k": 2000, "top_p": 1.0, "cfg_interval": -1}
# LlamaGen's GPT sizes (layers, dim) -> heads; any other size defaults to head_dim 64
HEADS = {(12, 768): 12, (24, 1024): 16, (36, 1280): 20, (48, 1536): 24, (22, 2048): 32, (48, 2560): 40,
         (24, 3200): 32}


#################################################################################
#                                  VQ model                                     #
#################################################################################

def vq_config(state: dict, source, l2_norm: bool = True) -> dict:
    """The tokar tokenizer node (name, quantizer, autoencoder) of a LlamaGen VQModel state_dict."""
    ch = require(state, "encoder.conv_in.weight", source).shape[0]
    levels = indices_under(state, "encoder.conv_blocks")
    if not levels:
        raise OfficialCheckpointError(f"{source}: no encoder.conv_blocks.* keys; not a LlamaGen VQModel state_dict")
    ch_mult = [require(state, f"encoder.conv_blocks.{i}.res.0.conv1.weight", source).shape[0] // ch for i in levels]
    n = len(levels)
    dec_mult = [require(state, f"decoder.conv_blocks.{i}.res.0.conv1.weight", source).shape[0] // ch
                for i in indices_under(state, "decoder.conv_blocks")][::-1]
    if dec_mult != ch_mult:
        raise OfficialCheckpointError(f"{source}: encoder_ch_mult {ch_mult} differs from decoder_ch_mult {dec_mult}; "
                                      "tokar's autoencoder mirrors one ch_mult")
    attn = [i for i in levels if f"encoder.conv_blocks.{i}.attn.0.q.weight" in state]
    dec_attn = [n - 1 - i for i in indices_under(state, "decoder.conv_blocks")
                if f"decoder.conv_blocks.{i}.attn.0.q.weight" in state]
    if sorted(dec_attn) != attn:
        raise OfficialCheckpointError(f"{source}: attention at encoder levels {attn} but decoder levels {dec_attn}")
    codebook = require(state, "quantize.embedding.weight", source)
    return {
        "name": "llamagen_vq",
        "quantizer": {"_target_": "tokenizers.vq.VQ", "dim": int(codebook.shape[1]),
                      "codebook_size": int(codebook.shape[0]), "beta": 0.25, "l2_norm": bool(l2_norm)},
        "autoencoder": {"ch": int(ch), "ch_mult": ch_mult,
                        "num_res_blocks": len(indices_under(state, "encoder.conv_blocks.0.res")),
                        "z_channels": int(require(state, "encoder.conv_out.weight", source).shape[0]), "dropout": 0.0,
                        "quant_conv_kernel": int(require(state, "quant_conv.weight", source).shape[-1]),
                        "attn_levels": attn, "mid_attn": "encoder.mid.1.q.weight" in state,
                        "downsample_pad": "asymmetric",
                        "decoder_res_blocks": len(indices_under(state, "decoder.conv_blocks.0.res"))},
    }


def vq_key_map(tokenizer, state: dict, source) -> dict:
    """{tokar key: (official key, ...)} of a LlamaGen VQModel; attention q, k, v are fused into one conv."""
    levels = indices_under(state, "encoder.conv_blocks")
    n, nrb = len(levels), len(indices_under(state, "encoder.conv_blocks.0.res"))
    dec_nrb = len(indices_under(state, "decoder.conv_blocks.0.res"))
    attn = {i for i in levels if f"encoder.conv_blocks.{i}.attn.0.q.weight" in state}
    mid = ["mid.0", "mid.1", "mid.2"] if "encoder.mid.1.q.weight" in state else ["mid.0"]
    enc = ["conv_in"]
    for i in levels:
        for j in range(nrb):
            enc += [f"conv_blocks.{i}.res.{j}"] + ([f"conv_blocks.{i}.attn.{j}"] if i in attn else [])
        if i < n - 1:
            enc.append(f"conv_blocks.{i}.downsample.conv")
    enc += mid + ["norm_out", "conv_out"]
    dec = ["conv_in"] + mid
    for i in range(n):  # decoder.conv_blocks.0 is the LOWEST resolution (level n-1-i), executed first
        for j in range(dec_nrb):
            dec += [f"conv_blocks.{i}.res.{j}"] + ([f"conv_blocks.{i}.attn.{j}"] if n - 1 - i in attn else [])
        if i < n - 1:
            dec.append(f"conv_blocks.{i}.upsample.conv")
    dec += ["norm_out", "conv_out"]
    key_map = autoencoder_map(tokenizer, enc, dec, state, source)
    for name in ("quant_conv", "post_quant_conv"):
        key_map.update({f"{name}.{p}": (f"{name}.{p}",) for p in ("weight", "bias")})
    key_map["quantizer.embed"] = ("quantize.embedding.weight",)
    return key_map


#################################################################################
#                                     GPT                                       #
#################################################################################

def gpt_config(state: dict, source, n_head: int | None = None) -> dict:
    """The tokar generator model node (with _target_) of a LlamaGen c2i Transformer state_dict."""
    dim = require(state, "tok_embeddings.weight", source).shape[1]
    depth = len(indices_under(state, "layers"))
    if "cls_embedding.embedding_table.weight" not in state:
        raise OfficialCheckpointError(f"{source}: missing key 'cls_embedding.embedding_table.weight'; only class-"
                                      "conditional (c2i) LlamaGen models are supported, not t2i")
    heads = n_head or HEADS.get((depth, dim), max(1, dim // 64))
    if dim % heads:
        raise OfficialCheckpointError(f"{source}: dim {dim} is not divisible by {heads} heads; pass n_head")
    head_dim = dim // heads
    rows = require(state, "layers.0.attention.wqkv.weight", source).shape[0]
    kv_heads, rest = divmod(rows - dim, 2 * head_dim)
    if rest or kv_heads < 1 or heads % kv_heads:
        raise OfficialCheckpointError(f"{source}: wqkv has {rows} rows, which no n_kv_head fits with {heads} heads of "
                                      f"{head_dim}; pass the right n_head")
    hidden = require(state, "layers.0.feed_forward.w1.weight", source).shape[0]
    if swiglu_hidden(dim, 4.0, 256) != hidden:
        raise OfficialCheckpointError(f"{source}: FFN width {hidden} is not find_multiple(int(8 dim / 3), 256) = "
                                      f"{swiglu_hidden(dim, 4.0, 256)}; ffn_dim_multiplier checkpoints are not "
                                      "supported")
    return {"_target_": "generators.gpt.GPT", "dim": int(dim), "depth": depth, "heads": int(heads),
            "mlp_ratio": 4.0, "class_dropout": 0.1, "dropout": 0.0, "rope_base": 10000.0, "norm_eps": 1e-5,
            "multiple_of": 256, "kv_heads": None if kv_heads == heads else int(kv_heads), "class_rope": "zero"}


def gpt_key_map(depth: int) -> dict:
    """{tokar key: (official key,)} of a LlamaGen GPT."""
    out = {"cls_embed.weight": ("cls_embedding.embedding_table.weight",),
           "tok_embed.weight": ("tok_embeddings.weight",), "norm.weight": ("norm.weight",), "head.weight": ("output.weight",)}
    for i in range(depth):
        for tok, off in (("attn_norm", "attention_norm"), ("attn.qkv", "attention.wqkv"), ("attn.proj", "attention.wo"),
                         ("ffn_norm", "ffn_norm"), ("ffn.w1", "feed_forward.w1"), ("ffn.w2", "feed_forward.w2"),
                         ("ffn.w3", "feed_forward.w3")):
            out[f"blocks.{i}.{tok}.weight"] = (f"layers.{i}.{off}.weight",)
    return out


#################################################################################
#                                    Import                                     #
#################################################################################

def import_llamagen(vq_path: str | Path, gpt_path: str | Path, out: str | Path | None = None, image_size: int = 256,
                    n_head: int | None = None, l2_norm: bool = True, overwrite: bool = False,
                    vq_state: dict | None = None, gpt_state: dict | None = None):
    """Official VQ + c2i GPT checkpoints -> (tokenizer, generator, tokenizer config, generator config).

    With ``out`` the two runs are written (<out>/tokenizer, <out>). ``vq_state`` / ``gpt_state`` skip reading the
    files (tests pass the golden state_dicts); the paths then only label messages.
    """
    from generators.module import build_generator, model_args
    from tokenizers.module import build_tokenizer

    vq = vq_state if vq_state is not None else read_state_dict(vq_path)
    gpt = gpt_state if gpt_state is not None else read_state_dict(gpt_path)
    # 1. the tokenizer run
    base = config_node("_shared", "autoencoder")
    node = {**base, **vq_config(vq, vq_path, l2_norm)}
    node["autoencoder"] = {**base["autoencoder"], **node["autoencoder"]}
    tokenizer = build_tokenizer(node, 3)
    tokenizer.token_shape(image_size)  # image_size must be a multiple of the downsampling factor
    num_classes = require(gpt, "cls_embedding.embedding_table.weight", gpt_path).shape[0] - 1
    data = imagenet_data(image_size, num_classes)
    source = {"format": "llamagen", "vq": str(vq_path), "gpt": str(gpt_path)}
    tok_config = {"kind": "tokenizer", "tokenizer": node, "data": data, "total_steps": 0, "source": source}
    remap(vq, vq_key_map(tokenizer, vq, vq_path), tokenizer, vq_path, ignored=[r"quantize\.codebook_used"],
          tokar_only=[r"quantizer\.cluster_size", r"quantizer\.initted"])
    # 2. the generator run
    gen_node = config_node("generator", "gpt")
    gen_node.update(model=gpt_config(gpt, gpt_path, n_head), sampling=dict(SAMPLING))
    h, w = tokenizer.token_shape(image_size)
    gen_config = {"kind": "generator", "generator": gen_node, "data": data,
                  "tokens": {"layout": "raster", "token_shape": [h, w], "scale_factor": 1.0, "cache": {}},
                  "model_args": model_args("gpt", tokenizer, image_size, num_classes, gen_node["model"]),
                  "total_steps": 0, "source": source}
    generator = build_generator(gen_config)
    remap(gpt, gpt_key_map(gen_node["model"]["depth"]), generator, gpt_path, ignored=[r"freqs_cis"])
    tokenizer.eval()
    generator.eval()
    if out is not None:
        write_runs(out, tokenizer, tok_config, generator, gen_config, overwrite)
    return tokenizer, generator, tok_config, gen_config
