"""Every decoding method on a GPU: absolute latency (CUDA events), ratio vs its plain sampler, host syncs, allocations.

    python benchmarks/gpu_decoding.py --gpt outputs/bench_gpt/generator --drafter /work/runs/lantern/bench_drafter \
        --var /work/runs/demo_pipeline/generator --refiner /work/runs/code/refiner_long \
        --dd /work/runs/dd/distill_var [--dd <GPT student>] --batches 1 16 --rounds 10 --json gpu.json

Row groups, each against its own reference sampler, same labels and seed:

- ``--gpt``: ``ar`` eager is the reference; ``--gpt-methods`` (method specs as in benchmarks/decoding.py,
  e.g. ``ar:compile=true``, ``sjd:compile=true``, ``lantern:delta=0.1,k=10``) are the rows;
- ``--var`` with ``--refiner``: the VAR's ``ar`` is the reference; its compiled ``ar`` (one CUDA graph per scale)
  and CoDe (``decoding=collaborative``) at each ``--code-n`` are the rows (the drafter is ``--var``);
- each ``--dd`` (a task=distill run): its teacher's ``ar`` is the reference; DD 1-step and 2-step are the rows.

Per row and batch size: both sides warmed up (``--warmup`` calls: compiled steps are captured there), then
``--rounds`` alternating A/B rounds; each call timed with CUDA events (utils.timing.Stopwatch; tokens only, the
tokenizer's decoder excluded). Reported: median ms per call of both sides, the median of the per-round ratios
(reference / method, > 1 = faster) with its min-max, images/s, forward passes per call, the host synchronisations
of one call (torch.cuda.set_sync_debug_mode: each implicit device-to-host wait inside the method; the one
explicit synchronize at the end of a call is not counted) and the device allocations (cudaMalloc) during the
timed rounds (0 = the caching allocator served every step). dtype: bf16 autocast on CUDA as sample.py samples,
fp32 on CPU (``--device cpu`` runs the same rows as a smoke test; its times are not GPU figures).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine  # noqa: E402

GPT_METHODS = ["ar:compile=true", "sjd", "sjd:draft_coupling=gumbel", "sjd:compile=true", "lantern:delta=0",
               "lantern:delta=0,tree=static", "lantern:delta=0.1,k=10", "lantern:delta=0.1,k=100,target=pointwise"]


class Side:
    """One side of a comparison: a decoder with its model, settings and tokenizer, called on labels."""

    def __init__(self, label: str, decoder, model, settings=None, tokenizer=None, sampling=None):
        self.label, self.decoder, self.model, self.settings = label, decoder, model, settings
        self.tokenizer, self.sampling = tokenizer, sampling

    def __call__(self, labels: torch.Tensor, seed: int) -> dict:
        g = torch.Generator(device=labels.device).manual_seed(seed)
        return self.decoder.run(self.model, labels, self.sampling, g, self.tokenizer, self.settings)[1]


def precision(device: torch.device):
    """bf16 autocast on CUDA (as sample.py samples), nothing on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def timed_call(side: Side, labels, seed: int, device) -> tuple[float, dict]:
    """(seconds, stats) of one call: CUDA events on CUDA, perf_counter on CPU."""
    from utils.timing import Stopwatch

    with precision(device), Stopwatch(device) as watch:
        stats = side(labels, seed)
    return watch.seconds, stats


def host_syncs(side: Side, labels, seed: int, device) -> int | None:
    """Implicit device-to-host synchronisations in one call (None on CPU)."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with precision(device):
                side(labels, seed)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def device_allocs(device) -> int:
    return torch.cuda.memory_stats(device).get("num_device_alloc", 0) if device.type == "cuda" else 0


def compare(ref: Side, method: Side, batch: int, num_classes: int, args, device) -> dict:
    """Warm-up, then alternating rounds of ref and method at one batch size -> the row's figures."""
    labels = torch.arange(batch, device=device) % num_classes
    for _ in range(args.warmup):
        timed_call(ref, labels, args.seed, device)
        stats = timed_call(method, labels, args.seed, device)[1]
    allocs = device_allocs(device)
    t_ref, t_m, ratios = [], [], []
    for r in range(args.rounds):
        order = (ref, method) if r % 2 == 0 else (method, ref)
        t = {id(s): timed_call(s, labels, args.seed + r, device)[0] for s in order}
        t_ref.append(t[id(ref)])
        t_m.append(t[id(method)])
        ratios.append(t[id(ref)] / t[id(method)])
    allocs = device_allocs(device) - allocs
    ms = statistics.median(t_m) * 1e3
    return {"reference": ref.label, "method": method.label, "batch": batch, "ref_ms": statistics.median(t_ref) * 1e3,
            "ms": ms, "images_per_s": batch / ms * 1e3, "ratio": statistics.median(ratios), "ratio_min": min(ratios),
            "ratio_max": max(ratios), "forward_passes": stats["forward_passes"],
            "host_syncs": host_syncs(method, labels, args.seed, device), "device_allocs": allocs}


def gpt_rows(args, device):
    """(reference, method sides, classes) of the GPT group."""
    from benchmarks.decoding import parse_method
    from decoding.registry import get_decoder
    from generators.module import sampling_config
    from utils.runs import load_generator

    model, tokenizer, config = load_generator(args.gpt, device)
    sampling = sampling_config(config["generator"]["sampling"])
    ref = Side("gpt ar", get_decoder("ar"), model, None, None, sampling)
    sides = []
    for spec in args.gpt_methods:
        label, decoder, settings = parse_method(spec, args.drafter)
        settings = decoder.prepare(settings, config, device) if decoder.prepare_fn else settings
        sides.append(Side(label, decoder, model, settings, None, sampling))
    return ref, sides, config["data"]["num_classes"]


def var_rows(args, device):
    """The VAR group: its ar against its compiled ar and CoDe at each N (refiner --refiner)."""
    from decoding.registry import get_decoder
    from generators.module import sampling_config
    from utils.runs import load_generator

    model, tokenizer, config = load_generator(args.var, device)
    sampling = sampling_config(config["generator"]["sampling"])
    ref = Side("var ar", get_decoder("ar"), model, None, tokenizer, sampling)
    code, ar = get_decoder("collaborative"), get_decoder("ar")
    sides = [Side("var ar:compile=true", ar, model, ar.parse_settings({"compile": True}), tokenizer, sampling)]
    sides += [Side(f"CoDe N={n}", code, model, code.prepare({"refiner_ckpt": args.refiner, "drafting_steps": n,
                                                            "drafter_temperature": None, "refiner_temperature": None},
                                                           config, device), tokenizer, sampling) for n in args.code_n]
    return ref, sides, config["data"]["num_classes"]


def dd_rows(path: str, device):
    """A distill run's group: its teacher's ar against the student at 1 and 2 steps."""
    from decoding.registry import get_decoder
    from generators.distill_student import load_teacher
    from generators.module import sampling_config
    from utils.runs import load_generator

    student, tokenizer, config = load_generator(path, device)
    d = config["distill"]
    teacher = load_teacher(d["teacher"]["path"], device, d["teacher"]["hash"])[0]
    sampling = sampling_config(config["generator"]["sampling"])
    dd = get_decoder("distilled")
    ref = Side(f"{teacher.kind} teacher ar", get_decoder("ar"), teacher, None, tokenizer, sampling)
    sides = [Side(f"DD {s}-step ({Path(path).name})", dd, student, dd.parse_settings({"steps": s}), tokenizer,
                  sampling) for s in (1, 2)]
    return ref, sides, config["data"]["num_classes"]


def table(rows: list[dict]) -> str:
    lines = ["| reference | method | batch | reference ms | method ms | images/s | ratio (ref / method) [min-max] "
             "| forward passes | host syncs per call | device allocs in timed rounds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['reference']} | {r['method']} | {r['batch']} | {r['ref_ms']:.2f} | {r['ms']:.2f} | "
                     f"{r['images_per_s']:.0f} | {r['ratio']:.2f} [{r['ratio_min']:.2f}-{r['ratio_max']:.2f}] | "
                     f"{r['forward_passes']} | {r['host_syncs']} | {r['device_allocs']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--gpt", default=None, help="a GPT run (the speculative rows)")
    parser.add_argument("--drafter", default=None, help="the draft head of the lantern rows")
    parser.add_argument("--gpt-methods", nargs="*", default=GPT_METHODS)
    parser.add_argument("--var", default=None, help="a VAR run: the reference and drafter of the CoDe rows")
    parser.add_argument("--refiner", default=None, help="the small VAR of the CoDe rows")
    parser.add_argument("--code-n", type=int, nargs="*", default=[2, 3, 4, 5])
    parser.add_argument("--dd", nargs="*", default=[], help="task=distill runs (GPT or VAR students)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    groups = ([lambda: gpt_rows(args, device)] if args.gpt else []) + \
             ([lambda: var_rows(args, device)] if args.var and args.refiner else []) + \
             [lambda p=p: dd_rows(p, device) for p in args.dd]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else machine()
    print(f"{name}; torch {torch.__version__}; {'bf16 autocast' if device.type == 'cuda' else 'fp32'}; "
          f"warm-up {args.warmup}, {args.rounds} alternating rounds", flush=True)
    rows, failures = [], []
    for group in groups:
        try:
            ref, sides, classes = group()
        except Exception as e:  # one group's failure must not lose the others' rows
            failures.append(f"loading a group: {type(e).__name__}: {e}")
            print(failures[-1], flush=True)
            continue
        for side in sides:
            for b in args.batches:
                try:
                    rows.append(compare(ref, side, b, classes, args, device))
                    print(rows[-1], flush=True)
                except Exception as e:
                    failures.append(f"{side.label} batch {b}: {type(e).__name__}: {e}")
                    print(failures[-1], flush=True)
                if args.json:
                    args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "argv": sys.argv,
                                                     "rows": rows, "failures": failures}, indent=2))
    print("\n" + table(rows))
    for f in failures:
        print("FAILED:", f)


if __name__ == "__main__":
    main()
