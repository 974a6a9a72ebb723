"""Distilled decoding (DD1) rows: a task=distill run against its teacher's ar, the columns of benchmarks/decoding.py.

    python benchmarks/distilled.py --ckpt outputs/dd_bench/distill [--no-fid] [--teacher-from 16 24]
    python benchmarks/distilled.py --ckpt <distill run of a VAR> --teacher-from 2 3 --ar-fids 77.67 76.84
    python benchmarks/distilled.py --ckpt <copied run> --teacher <copied teacher> --tokenizer <copied tokenizer> \
        --device cuda --no-fid --rounds 11     # a GPU machine: runs moved there are hash-checked, not path-checked

Rows: the teacher's ``ar``; the student's ``distilled`` at steps=1, steps=2, and steps=2 with the teacher decoding
positions (a VAR student: scales) teacher_from..split-1 (one row per --teacher-from; default split/2 and 3 split/4).
GPT and VAR teachers alike (the tokenizer is passed to every decoder: VAR's ar needs its msvq). Per row:

- forward passes per batch (student + teacher; ar: one per token);
- latency ratio vs the teacher's ar (ar time / method time, > 1 = faster) at batch 1 and 16: both warmed up, then
  ``--rounds`` alternating rounds (same labels, same seed), median [min-max]; tokens only (no tokenizer decode);
- FID-1k against the same reference statistics as sample.py (the teacher's ar at ``--fid-seeds`` seeds gives the
  seed-to-seed spread; ``--ar-fids`` takes those values from an earlier run with exactly these FID settings, sample.py
  ``fid.num_samples=N fid.reference_images=N`` at batch 250, instead of recomputing them);
- the student's cost: pairs generation (the chunks' recorded build time) + training (the run's metrics.json),
  CPU minutes, with the number of pairs and steps.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(decoder, model, labels, sampling, seed, settings, tokenizer=None) -> tuple[float, dict]:
    """(seconds, stats) of one call from a fresh generator seeded ``seed``."""
    g = torch.Generator(device=labels.device).manual_seed(seed)
    t0 = time.perf_counter()
    _, stats = decoder.run(model, labels, sampling, g, tokenizer, settings)
    return time.perf_counter() - t0, stats


def latency_ratio(ar, teacher, decoder, student, settings, sampling, labels, rounds: int, seed: int, tokenizer=None):
    """Median, min, max over alternating rounds of (teacher ar time) / (method time) on the same labels and seed."""
    timed(ar, teacher, labels, sampling, seed, None, tokenizer)
    timed(decoder, student, labels, sampling, seed, settings, tokenizer)
    ratios = []
    for r in range(rounds):
        t_ar = timed(ar, teacher, labels, sampling, seed + r, None, tokenizer)[0]
        t_dd = timed(decoder, student, labels, sampling, seed + r, settings, tokenizer)[0]
        ratios.append(t_ar / t_dd)
    return statistics.median(ratios), min(ratios), max(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--ckpt", required=True, help="a task=distill run folder")
    parser.add_argument("--teacher-from", type=int, nargs="*", default=None,
                        help="teacher-involved rows, in the student's split units (GPT tokens, VAR scales; default "
                             "split/2 and 3 split/4)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--fid-samples", type=int, default=1000)
    parser.add_argument("--fid-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--reference-images", type=int, default=1000)
    parser.add_argument("--ar-fids", type=float, nargs="*", default=None,
                        help="the teacher's FIDs at --fid-seeds from an earlier run with exactly these FID settings "
                             "(not recomputed)")
    parser.add_argument("--no-fid", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where both models run (fp32; CUDA timings are synchronised around every call)")
    parser.add_argument("--teacher", default=None,
                        help="the teacher run if it moved (hash-checked); default the path the distill run recorded")
    parser.add_argument("--tokenizer", default=None,
                        help="the tokenizer run if it moved (hash-checked); default the recorded path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from decoding.registry import get_decoder
    from generators.distill_student import load_teacher, pairs_seconds
    from generators.module import generator_fid, sampling_config
    from utils.runs import load_generator

    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible here; run with --device cpu")
    device = torch.device(args.device)
    student, tokenizer, config = load_generator(args.ckpt, device, args.tokenizer)
    d = config["distill"]
    teacher, _, tconfig, _ = load_teacher(args.teacher or d["teacher"]["path"], device, d["teacher"]["hash"],
                                          args.tokenizer)
    sampling = sampling_config(config["generator"]["sampling"])
    split = max(student.splits)
    ar, dd = get_decoder("ar"), get_decoder("distilled")
    methods = [("teacher ar", ar, None), ("DD 1-step", dd, dd.parse_settings({"steps": 1})),
               ("DD 2-step", dd, dd.parse_settings({"steps": 2}))]
    for s in args.teacher_from if args.teacher_from is not None else sorted({split // 2, 3 * split // 4}):
        settings = dd.parse_settings({"steps": 2, "teacher_from": s, "flow_steps": d["flow"]["steps"]})
        settings.teacher = teacher
        methods.append((f"DD teacher {s}..{split - 1}", dd, settings))
    labels = (torch.arange(max(args.batches)) % config["data"]["num_classes"]).to(device)
    ar_fids = list(args.ar_fids or [])
    if not args.no_fid and not ar_fids:
        for seed in args.fid_seeds:
            ar_fids.append(generator_fid(teacher, tokenizer, tconfig, args.fid_samples, sampling, 250, seed, device,
                                         "test", args.reference_images)["fid"])
            print(f"teacher ar FID-{args.fid_samples} seed {seed}: {ar_fids[-1]:.2f}", flush=True)
    rows = []
    for label, decoder, settings in methods:
        model = teacher if decoder is ar else student
        row = {"method": label, "forward_passes": timed(decoder, model, labels, sampling, args.seed, settings,
                                                        tokenizer)[1]["forward_passes"]}
        if decoder is not ar:
            for b in args.batches:
                row[f"latency_ratio_b{b}"] = latency_ratio(ar, teacher, decoder, student, settings, sampling,
                                                           labels[:b], args.rounds, args.seed, tokenizer)
            if not args.no_fid:
                row["fid"] = generator_fid(student, tokenizer, config, args.fid_samples, sampling, 250,
                                           args.fid_seeds[0], device, "test", args.reference_images, decoder=decoder,
                                           settings=settings)["fid"]
        elif ar_fids:
            row["fid"] = ar_fids[0]
        rows.append(row)
        print(row, flush=True)
    metrics_file = Path(args.ckpt) / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {"steps": None,
                                                                                  "train_seconds": float("nan")}
    folder = Path(d["pairs"]["folder"])  # not copied along with a moved run: its cost is then unknown
    pairs = pairs_seconds(folder, d["pairs"]["num_pairs"]) if folder.exists() else float("nan")
    cost = {"pairs": d["pairs"]["num_pairs"], "pairs_minutes": pairs / 60, "train_steps": metrics["steps"],
            "train_minutes": metrics["train_seconds"] / 60, "flow_steps": d["flow"]["steps"], "splits": d["splits"],
            "threads": args.threads, "device": args.device}
    print("student cost:", cost, flush=True)
    heads = "".join(f" latency ratio b{b} |" for b in args.batches)
    print(f"\n| method | forward passes |{heads} FID-{args.fid_samples} |\n|---|---|{'---|' * len(args.batches)}---|")
    for r in rows:  # the teacher's own ratio is 1; a value not measured (--no-fid) is "-"
        lat = [f"{r[k][0]:.1f}x [{r[k][1]:.1f}-{r[k][2]:.1f}]" if k in r else "1" if r["method"] == "teacher ar"
               else "-" for k in (f"latency_ratio_b{b}" for b in args.batches)]
        fid = f"{r['fid']:.2f}" if "fid" in r else "-"
        print(f"| {r['method']} | {r['forward_passes']} | {' | '.join(lat)} | {fid} |")
    if ar_fids:
        print(f"teacher ar FID-{args.fid_samples} over seeds {args.fid_seeds}: {', '.join(f'{f:.2f}' for f in ar_fids)}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "ar_fids": ar_fids, "cost": cost, "argv": sys.argv}, indent=2))


if __name__ == "__main__":
    main()
