"""Import official VAR or LlamaGen checkpoints as ordinary tokar runs.

    python -m tools.import_checkpoint var --vae vae_ch160v4096z32.pth --var var_d16.pth --out runs/var-d16
    python -m tools.import_checkpoint llamagen --vq vq_ds16_c2i.pt --gpt c2i_B_256.pt --out runs/llamagen-b

<out> becomes a generator run (model.safetensors + config.yaml) and <out>/tokenizer its tokenizer run, linked by
the tokenizer's hash: ``python sample.py ckpt=<out>`` samples, ``tokenizer_ckpt=<out>/tokenizer`` trains on its tokens.
Architecture and size are read from the tensors' shapes; the official demo's sampling settings are recorded as
the generator's defaults. Files load with torch.load(weights_only=True) or safetensors, never unpickling objects.
"""
from __future__ import annotations

import argparse
import sys

from tools.official import OfficialCheckpointError


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.import_checkpoint", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="format", required=True)
    var = sub.add_parser("var", help="FoundationVision/VAR: VQVAE + VAR transformer (plain state_dicts)")
    var.add_argument("--vae", required=True, help="the VQVAE checkpoint, e.g. vae_ch160v4096z32.pth")
    var.add_argument("--var", required=True, help="the transformer checkpoint, e.g. var_d16.pth")
    var.add_argument("--patch-nums", type=int, nargs="+", default=None,
                     help="scales (default: read from the transformer's lvl_1L buffer)")
    var.add_argument("--using-znorm", action="store_true", help="cosine code lookup (the released VQVAE uses L2)")
    llama = sub.add_parser("llamagen", help="FoundationVision/LlamaGen: VQ model + c2i GPT ({'model': state_dict})")
    llama.add_argument("--vq", required=True, help="the VQ checkpoint, e.g. vq_ds16_c2i.pt")
    llama.add_argument("--gpt", required=True, help="the GPT checkpoint, e.g. c2i_B_256.pt")
    llama.add_argument("--image-size", type=int, default=256, help="256 or 384 (c2i_*_384.pt); sets the token grid")
    llama.add_argument("--n-head", type=int, default=None,
                       help="attention heads (default: LlamaGen's for the size read from the weights, else dim / 64)")
    for p in (var, llama):
        p.add_argument("--out", required=True, help="the run folder to write (<out>/tokenizer holds the tokenizer)")
        p.add_argument("--overwrite", action="store_true", help="replace an earlier import in --out")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.format == "var":
            from tools.var import import_var

            _, generator, _, config = import_var(args.vae, args.var, args.out, args.patch_nums, args.using_znorm,
                                                 args.overwrite)
        else:
            from tools.llamagen import import_llamagen

            _, generator, _, config = import_llamagen(args.vq, args.gpt, args.out, args.image_size, args.n_head,
                                                      overwrite=args.overwrite)
    except (OfficialCheckpointError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = sum(p.numel() for p in generator.parameters())
    sampling = " ".join(f"{k}={v}" for k, v in config["generator"]["sampling"].items())
    classes = [207, 360, 387, 974, 88, 979, 417, 279] if config["data"]["num_classes"] == 1000 else \
        list(range(min(8, config["data"]["num_classes"])))
    print(f"imported {args.format} ({n / 1e6:.1f}M generator parameters, {config['data']['image_size']}px, "
          f"{config['data']['num_classes']} classes)\n"
          f"generator run : {args.out}\ntokenizer run : {args.out}/tokenizer\n"
          f"sampling defaults (official demo): {sampling}\n"
          f"sample        : python sample.py ckpt={args.out} classes=[{','.join(map(str, classes))}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
