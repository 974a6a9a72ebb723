"""The decoding benchmark: one trained generator, every decoding method a row, measured side by side.

    python benchmarks/decoding.py --ckpt outputs/bench_gpt/generator [--append]
    python benchmarks/decoding.py --ckpt <run> --methods ar "sjd:window=32,draft_coupling=gumbel" --no-fid
    python benchmarks/decoding.py --ckpt <run> --drafter <drafter run> --methods ar "lantern:delta=0" \
        "lantern:delta=0,tree=static" "lantern:delta=0.1,k=100" "lantern:delta=null,lam=5" \
        "sjd:relax=lantern,delta=0.1" --json rows.json
    python benchmarks/tradeoff_plot.py rows.json [fid_*.json] --out benchmarks/lantern_tradeoff.png

``lantern`` rows take the draft head from ``--drafter`` (or their own ``drafter_ckpt=``); every method is
prepared as sample.py prepares it (the drafter, the codebook neighbour table).

A method is ``name`` or ``name:key=value,...`` (the settings of configs/decoding/<name>.yaml); the default
list is ar, sjd for every init scheme, sjd with each draft coupling and sjd at windows 8 and 32. Per row:

- step compression: tokens / target forward passes of a batch (every image of the batch waits for the
  batch's forwards), at batch 16 and at batch 1 (the per-row figure), over ``--images`` class-balanced images;
- mean accepted length: mean of accepted + 1 over the row-forwards (speculative methods);
- latency ratio vs ar (ar time / method time, > 1 = faster) at batch 1 and 16: both warmed up, then
  ``--rounds`` alternating A/B rounds in this process (same labels, same seed), median [min-max];
- FID-1k against the same reference statistics as sample.py, beside ar's FID-1k at ``--fid-seeds`` seeds
  (the seed-to-seed spread: the noise a difference must exceed);
- the measured TV budget of relaxed rows (LANTERN δ / λ, sjd relax=lantern), batch 1: TV(p, relaxed target) per
  verified position (the δ rule bounds it by δ) and its sum along an image (mean over images), which bounds the
  TV between the sampled and the target joint (the composed bound, at most tokens x δ).

Also printed: the entropy of ar's p per token and the acceptance per draft index, which explain a low
acceptance. Tokens only: the tokenizer's decoder is not in the latency (it is the same for every method).
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, report  # noqa: E402

DEFAULT_METHODS = ["ar", "sjd:init=random", "sjd:init=repeat_horizon", "sjd:init=sample_horizon",
                   "sjd:init=repeat_vertical", "sjd:draft_coupling=maximal", "sjd:draft_coupling=gumbel",
                   "sjd:window=8", "sjd:window=32"]


def parse_method(spec: str, drafter: str | None = None):
    """'name:key=value,...' -> (label, registry entry, settings dataclass); lantern rows get ``drafter``."""
    import yaml

    from decoding.registry import get_decoder

    name, _, rest = spec.partition(":")
    decoder = get_decoder(name)
    cfg_file = ROOT / "configs" / "decoding" / f"{name}.yaml"
    values = yaml.safe_load(cfg_file.read_text()) if cfg_file.exists() else {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        values[key] = yaml.safe_load(value)
    if name == "lantern" and drafter and not values.get("drafter_ckpt"):
        values["drafter_ckpt"] = drafter
    return spec, decoder, decoder.parse_settings(values)


def timed(decoder, model, labels, sampling, seed, settings) -> tuple[float, dict]:
    """(seconds, stats) of one call from a fresh generator seeded ``seed``."""
    g = torch.Generator(device=labels.device).manual_seed(seed)
    t0 = time.perf_counter()
    _, stats = decoder.run(model, labels, sampling, g, None, settings)  # synchronized inside
    return time.perf_counter() - t0, stats


def step_stats(decoder, settings, model, sampling, labels: torch.Tensor, batch: int, seed: int) -> dict:
    """Step compression (tokens / batch forwards) and mean accepted length over labels at one batch size."""
    forwards, acc_sum, acc_n, by_index, tv_pos, tv_seq = 0, 0.0, 0, None, [], []
    for i in range(0, len(labels), batch):
        _, s = timed(decoder, model, labels[i:i + batch], sampling, seed + i, settings)
        forwards += s["forward_passes"]
        if "tv_composed" in s:
            tv_pos.append(s["tv_per_position"])
            tv_seq.append(s["tv_composed"])
        if "mean_accepted_length" in s:
            acc_sum += s["mean_accepted_length"] * s["row_forward_passes"] * len(labels[i:i + batch])
            acc_n += s["row_forward_passes"] * len(labels[i:i + batch])
            idx = torch.tensor(s["acceptance_by_draft_index"]) * s["row_forward_passes"] * len(labels[i:i + batch])
            by_index = idx if by_index is None else by_index + idx
    calls = -(-len(labels) // batch)
    out = {"step_compression": model.num_tokens * calls / forwards,
           "mean_accepted_length": acc_sum / acc_n if acc_n else 1.0}
    if by_index is not None:
        out["acceptance_by_draft_index"] = (by_index / acc_n).tolist()
    if tv_seq:
        out["tv_per_position"], out["tv_composed"] = statistics.mean(tv_pos), statistics.mean(tv_seq)
    return out


def tv_bounds(settings, tokens: int) -> tuple[float, float] | None:
    """The δ rule's TV bounds (per position δ, composed tokens x δ); None for exact rows, the λ rule (whose
    per-position bound (λ - 1) E_q[p(x)] depends on the distributions: only the measured budget is shown) and
    target=pointwise with sampled drafts (its output is no relaxed target of p for soft drafts: no bound, the TV
    shown is r_x's; greedy drafts are verified as q = 1, so their output is r_x and the bound holds)."""
    delta = getattr(settings, "delta", None)
    relaxed = getattr(settings, "relax", "lantern") == "lantern" and getattr(settings, "k", 0) > 0
    soft_pointwise = getattr(settings, "target", "mixture") == "pointwise" and getattr(settings, "draft", "") != "greedy"
    if soft_pointwise:  # LANTERN's per-draft rule: no bound for soft drafts
        return None
    return (delta, tokens * delta) if relaxed and delta is not None and delta > 0 else None


def latency_ratio(decoder, settings, ar, model, sampling, labels, rounds: int, seed: int) -> tuple[float, float, float]:
    """Median [min, max] over alternating rounds of ar time / method time on the same labels and seed."""
    timed(ar, model, labels, sampling, seed, None)  # warm-up both
    timed(decoder, model, labels, sampling, seed, settings)
    ratios = []
    for r in range(rounds):
        order = [(ar, None), (decoder, settings)] if r % 2 == 0 else [(decoder, settings), (ar, None)]
        t = {id(d): timed(d, model, labels, sampling, seed + r, s)[0] for d, s in order}
        ratios.append(t[id(ar)] / t[id(decoder)])
    return statistics.median(ratios), min(ratios), max(ratios)


@torch.no_grad()
def ar_entropy(model, sampling, labels, seed: int) -> float:
    """Mean entropy (nats) of ar's p per token along ar's own samples (full forward, CFG as sampled)."""
    from decoding.registry import get_decoder
    from decoding.speculative import target_probs

    tokens, _ = get_decoder("ar").run(model, labels, sampling, torch.Generator().manual_seed(seed))
    guided = sampling.cfg_scale != 1.0
    cond = model.cls_embed.with_null(labels) if guided else labels
    logits = model(tokens.repeat(2, 1) if guided else tokens, cond)  # (B', N, V)
    index = torch.arange(model.num_tokens)[None].expand(len(labels), -1)
    p = target_probs(logits, index, sampling, len(labels))
    return float(-(p * p.clamp_min(1e-30).log()).sum(-1).mean())


def write_json(args, rows: list[dict], fid_of: dict, entropy: float | None, tokens: int) -> None:
    """The rows so far as JSON (``--json``; benchmarks/tradeoff_plot.py reads it)."""
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "ar_fids": {str(k[1]): v for k, v in fid_of.items()},
                                         "entropy": entropy, "argv": sys.argv, "tokens": tokens,
                                         "batches": args.batches}, indent=2))


def table(rows: list[dict], b1: int, b16: int) -> str:
    """The markdown table of benchmark rows (missing cells: –)."""
    def cell(r, key, fmt="{:.2f}"):
        return fmt.format(r[key]) if r.get(key) is not None else "–"

    def lat(r, key):
        return f"{r[key][0]:.2f} [{r[key][1]:.2f}-{r[key][2]:.2f}]" if key in r else ("1" if r["method"] == "ar" else "–")

    def tv(r, key, bound):
        if r.get(key) is None:
            return "0" if "tv_per_position" not in r and r["method"] == "ar" else cell(r, key, "{:.3f}")
        return f"{r[key]:.3f}" + (f" (≤ {r[bound]:.3g})" if r.get(bound) is not None else "")

    lines = [f"| method | step compression (batch {b16}) | step compression (batch {b1}) | mean accepted length | "
             f"latency ratio vs ar, batch {b1} | latency ratio vs ar, batch {b16} | FID-1k | TV per position "
             "(bound) | composed TV per image (bound) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {cell(r, f'sc{b16}')} | {cell(r, f'sc{b1}')} | {cell(r, f'acc{b1}')} | "
                     f"{lat(r, f'lat{b1}')} | {lat(r, f'lat{b16}')} | {cell(r, 'fid')} | "
                     f"{tv(r, 'tv_per_position', 'tv_bound')} | {tv(r, 'tv_composed', 'tv_composed_bound')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--ckpt", required=True, help="a trained GPT run folder")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--drafter", default=None, help="the draft head run of the lantern rows (task=drafter)")
    parser.add_argument("--title", default="Decoding: speculative methods vs ar on one GPT")
    parser.add_argument("--images", type=int, default=160, help="images for the step statistics (class-balanced)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating A/B rounds per latency ratio")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--fid-samples", type=int, default=1000)
    parser.add_argument("--fid-seeds", type=int, nargs="+", default=[0, 1, 2], help="ar's FID seeds (spread)")
    parser.add_argument("--reference-images", type=int, default=1000)
    parser.add_argument("--no-fid", action="store_true")
    parser.add_argument("--no-speed", action="store_true", help="FID only (run the speed rows in another process)")
    parser.add_argument("--fid-methods", nargs="*", default=None, help="FID only for these methods (default: all)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()

    from decoding.registry import get_decoder
    from generators.module import describe_sampling, generator_fid, sampling_config
    from sample import load_generator

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    device = torch.device("cpu")
    model, tokenizer, config = load_generator(args.ckpt, device)
    sampling = sampling_config(config["generator"]["sampling"])
    num_classes = config["data"]["num_classes"]
    labels = (torch.arange(args.images) % num_classes).to(device)
    ar = get_decoder("ar")
    methods = [(label, decoder, decoder.prepare(settings, config, device) if decoder.prepare_fn else settings)
               for label, decoder, settings in (parse_method(m, args.drafter) for m in args.methods)]
    fid_of = {}
    if not args.no_fid and "ar" in args.methods:  # ar's seed-to-seed spread (the other rows use the first seed)
        for seed in args.fid_seeds:
            fid_of[("ar", seed)] = generator_fid(model, tokenizer, config, args.fid_samples, sampling, 250, seed,
                                                 device, "test", args.reference_images)["fid"]
            print(f"ar FID seed {seed}: {fid_of[('ar', seed)]:.2f}", flush=True)
    rows = []
    for label, decoder, settings in methods:
        row = {"method": label}
        for b in ([] if args.no_speed else args.batches):
            st = step_stats(decoder, settings, model, sampling, labels, b, args.seed)
            row[f"sc{b}"], row[f"acc{b}"] = st["step_compression"], st["mean_accepted_length"]
            row.setdefault("by_index", st.get("acceptance_by_draft_index"))
            for key in ("tv_per_position", "tv_composed"):
                if key in st:
                    row.setdefault(key, st[key])
            if tv_bounds(settings, model.num_tokens):
                row["tv_bound"], row["tv_composed_bound"] = tv_bounds(settings, model.num_tokens)
            if decoder.name != "ar":
                row[f"lat{b}"] = latency_ratio(decoder, settings, ar, model, sampling, labels[:b], args.rounds,
                                               args.seed)
        if not args.no_fid and (args.fid_methods is None or label in args.fid_methods):
            row["fid"] = (fid_of[("ar", args.fid_seeds[0])] if decoder.name == "ar" else
                          generator_fid(model, tokenizer, config, args.fid_samples, sampling, 250, args.fid_seeds[0],
                                        device, "test", args.reference_images, decoder=decoder, settings=settings)["fid"])
        rows.append(row)
        print(row, flush=True)
        write_json(args, rows, fid_of, None, model.num_tokens)  # after every row: a killed run keeps its rows
    entropy = ar_entropy(model, sampling, labels[:64], args.seed)
    write_json(args, rows, fid_of, entropy, model.num_tokens)
    if args.no_speed:
        print({"ar_fids": fid_of, "rows": rows, "entropy": entropy})
        return

    fids = [fid_of[("ar", s)] for s in args.fid_seeds] if fid_of else []
    b1, b16 = args.batches[0], args.batches[-1]
    lines = [f"## {args.title} ({datetime.date.today()})", "",
             f"`python benchmarks/decoding.py --ckpt {args.ckpt} " + " ".join(
                 ([f"--drafter {args.drafter}"] if args.drafter else [])
                 + [f"--methods {' '.join(args.methods)} --images {args.images} --rounds {args.rounds} "
                  f"--threads {args.threads}"]
                 + (["--no-fid"] if args.no_fid else [f"--fid-samples {args.fid_samples}"])
                 + (["--append"] if args.append else [])) + f"` ({time.perf_counter() - start:.0f} s; {machine()}; "
             f"torch {torch.__version__}, fp32, CPU, {args.threads} threads, seed {args.seed}).",
             f"Model: {config['generator']['name']} {config['generator']['model'].get('name')} "
             f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M), {model.num_tokens} tokens "
             f"(grid {tuple(model.grid_size)}), vocabulary {model.vocab_size}; sampling: "
             f"{describe_sampling(sampling, config)}. Mean entropy of ar's p per token: {entropy:.2f} nats.",
             "Step compression = tokens / target forward passes of a batch; mean accepted length = mean of "
             "accepted + 1 per row-forward; latency ratio = ar time / method time (> 1 = faster), tokens only, "
             f"median [min-max] of {args.rounds} alternating A/B rounds after warm-up (CPU perf_counter; indicative)."]
    if fids:
        lines.append(f"FID-{args.fid_samples // 1000}k vs {config['data']['name']}:test ({args.reference_images}), "
                     f"standard Inception (torchmetrics), EMA weights; ar at seeds {args.fid_seeds}: "
                     + ", ".join(f"{f:.2f}" for f in fids) + f" (spread {max(fids) - min(fids):.2f}); "
                     f"every other row at seed {args.fid_seeds[0]}.")
    lines += ["", table(rows, b1, b16), ""]
    lines.append("Acceptance per draft index (fraction of row-forwards whose first i+1 drafts were accepted, "
                 f"batch {b1}):")
    for r in rows:
        if r.get("by_index"):
            lines.append(f"- {r['method']}: " + " ".join(f"{a:.2f}" for a in r["by_index"][:16]))
    report("\n".join(lines) + "\n", args.append)


if __name__ == "__main__":
    main()
