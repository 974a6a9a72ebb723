"""Training and sampling speed of each generator at demo size (32x32 Fashion-MNIST shapes, f4 tokenizers).

    python benchmarks/generators.py [--batch-size 16] [--train-steps 20] [--repeats 3] [--threads 1] [--append]

Every generator is built from its configs/generator/<name>.yaml on the tokenizer it pairs with
(configs/tokenizer/{fsq,msvq,kl}.yaml at the demo width, untrained: speed does not depend on the weights),
and runs through the real GeneratorModule loss and decoding.ar sampler:

- train steps/s: forward + backward + AdamW + EMA on random cached codes (batch --batch-size);
- sampling images/s with the generator's default sampling settings (CFG on), tokens only and including the
  tokenizer's decode, and target forward passes per image (sequential, batched);
- the share of sampling time spent outside the network's forward passes (sampling, CFG mixing, Euler
  updates, msvq f_hat bookkeeping, Python), measured by timing every prefill / step (and FlowAR flow-head
  call) separately. Target: <= 10 %.

Timings are medians over --repeats after one warm-up call; CUDA (bf16 autocast) is synchronized around every
timed call. --append adds the table to benchmarks/RESULTS.md under "## Generators".
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

PAIRS = {"gpt": "fsq", "var": "msvq", "flowar": "kl"}
IMAGE_SIZE, NUM_CLASSES, CHANNELS = 32, 10, 1


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def tokenizer_config(name: str) -> dict:
    """configs/tokenizer/<name>.yaml over configs/_shared/autoencoder.yaml, at the demo width (ch 32, f4)."""
    base = load_yaml(ROOT / "configs/_shared/autoencoder.yaml")
    own = load_yaml(ROOT / f"configs/tokenizer/{name}.yaml")
    own.pop("defaults", None)
    for key, value in own.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    base["autoencoder"]["ch"] = 32
    return base


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(gen: str, device: torch.device):
    """(GeneratorModule with its frozen tokenizer, config) at demo size."""
    from data.token_cache import layout_of
    from generators.module import GeneratorModule, model_args
    from tokenizers.module import build_tokenizer

    tok_cfg = tokenizer_config(PAIRS[gen])
    tokenizer = build_tokenizer(tok_cfg, CHANNELS).to(device).eval().requires_grad_(False)
    gen_cfg = load_yaml(ROOT / f"configs/generator/{gen}.yaml")
    shape = tokenizer.token_shape(IMAGE_SIZE)
    config = {"kind": "generator", "generator": gen_cfg,
              "data": {"name": "fashion_mnist", "image_size": IMAGE_SIZE, "channels": CHANNELS,
                       "num_classes": NUM_CLASSES},
              "tokenizer": {"path": "(untrained, in memory)", "hash": "-", "name": PAIRS[gen]},
              "tokens": {"layout": layout_of(tokenizer.quantizer),
                         "token_shape": [list(s) for s in shape] if gen == "var" else list(shape), "scale_factor": 1.0},
              "model_args": model_args(gen, tokenizer, IMAGE_SIZE, NUM_CLASSES, gen_cfg["model"]), "total_steps": 1000}
    module = GeneratorModule(config, tokenizer=tokenizer).to(device)
    return module, config


def random_codes(module, config, batch: int, device: torch.device) -> torch.Tensor:
    args, layout = config["model_args"], config["tokens"]["layout"]
    if layout == "latent":
        h, w = config["tokens"]["token_shape"]
        return torch.randn(batch, args["latent_channels"], h, w, device=device)
    length = module.model.L if layout == "multiscale" else args["block_size"]
    return torch.randint(args["vocab_size"], (batch, length), device=device, dtype=torch.int32)


def autocast(device: torch.device):
    import contextlib

    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def train_speed(module, config, batch: int, steps: int, device: torch.device) -> float:
    """Optimizer steps per second (forward, backward, clip, AdamW, EMA)."""
    opt = torch.optim.AdamW(module.model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    codes = random_codes(module, config, batch, device)
    labels = torch.randint(NUM_CLASSES, (batch,), device=device)
    module.model.train()

    def step():
        with autocast(device):
            loss, _ = module._loss(module.model, codes, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.model.parameters(), config["generator"]["grad_clip"])
        opt.step()
        module.ema.update(module.model)

    for _ in range(3):  # warm-up
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps / (time.perf_counter() - t0)


class ForwardTimer:
    """Wraps the network's decoding entry points (prefill, step, FlowAR's flow head) and sums their time."""

    def __init__(self, model, device: torch.device):
        self.seconds, self.calls, self.device = 0.0, 0, device
        targets = [(model, "prefill"), (model, "step")]
        if hasattr(model, "head") and hasattr(model.head, "sample"):  # FlowAR: every velocity evaluation
            targets.append((model.head, "forward"))
        for obj, name in targets:
            setattr(obj, name, self._wrap(getattr(obj, name)))

    def _wrap(self, fn):
        def timed(*args, **kwargs):
            sync(self.device)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(self.device)
            self.seconds += time.perf_counter() - t0
            self.calls += 1
            return out

        return timed


def sample_speed(module, config, batch: int, repeats: int, device: torch.device) -> dict:
    """Median images/s (tokens only, with decode), forward passes per image, share of time outside forwards."""
    from decoding.ar import generate
    from generators.module import decode_tokens, sampling_config

    model, tokenizer = module.ema.shadow.eval(), module.tokenizer
    sampling = sampling_config(config["generator"]["sampling"])
    msvq = tokenizer.quantizer if config["tokens"]["layout"] == "multiscale" else None
    labels = torch.arange(batch, device=device) % NUM_CLASSES
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad(), autocast(device):
        generate(model, labels, sampling, g, msvq)  # warm-up, untimed
        plain, with_decode = [], []
        for _ in range(repeats):  # without the forward timer: its syncs would add to the total
            sync(device)
            t0 = time.perf_counter()
            tokens, stats = generate(model, labels, sampling, g, msvq)
            t1 = time.perf_counter()
            decode_tokens(tokenizer, tokens, config["tokens"]["layout"], config["tokens"]["token_shape"], 1.0)
            sync(device)
            plain.append(t1 - t0)
            with_decode.append(time.perf_counter() - t0)
        timer, outside = ForwardTimer(model, device), []
        for _ in range(repeats):
            timer.seconds = 0.0
            sync(device)
            t0 = time.perf_counter()
            generate(model, labels, sampling, g, msvq)
            sync(device)
            total = time.perf_counter() - t0
            outside.append(1 - timer.seconds / total)
    for name in ("prefill", "step"):  # drop the wrappers (instance attributes shadow the methods)
        model.__dict__.pop(name, None)
    if hasattr(model, "head"):
        model.head.__dict__.pop("forward", None)
    t_plain, t_dec = statistics.median(plain), statistics.median(with_decode)
    result = {"images_per_s": batch / t_plain, "images_per_s_decode": batch / t_dec,
              "forward_passes": stats["forward_passes"], "outside": statistics.median(outside)}
    if config["generator"]["name"] == "flowar":
        result["head_calls"] = stats["forward_passes"] * sampling.num_steps
    return result


#################################################################################
#            Sampling at the hardware limit (VAR-d6 / GPT at batch 16)          #
#################################################################################

VAR_SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # VAR's 256 px schedule, 680 tokens
LIMIT_SAMPLING = {"cfg_scale": 1.5, "top_k": 900, "top_p": 0.96, "temperature": 1.0}  # VAR's FID setting


LIMIT_MODELS = ("VAR-d6", "GPT-d6", "VAR-d16")  # --models; VAR-d16 (310M) only when asked: ~1.5 min a generate
LIMIT_DEFAULT = ("VAR-d6", "GPT-d6")


def limit_model(name: str, vocab: int, num_classes: int = 1000):
    """(model, msvq or None) for one --models name, random weights: a VAR-d<depth> on a ``vocab``-code msvq with
    VAR's 256 px scales, or GPT-d6 = a GPT of VAR-d6's width and depth (6 x 384, 16x16 = 256 tokens)."""
    from generators.gpt import GPT
    from generators.var import build_var
    from tokenizers.msvq import MultiScaleVQ

    if name not in LIMIT_MODELS:
        raise ValueError(f"--models {name!r}: choose from {', '.join(LIMIT_MODELS)}")
    if name == "GPT-d6":
        gpt = GPT(vocab, num_classes, 256, dim=384, depth=6, heads=6).eval()
        torch.nn.init.normal_(gpt.head.weight, std=0.02)  # LlamaGen zero-inits the head: give it non-flat logits
        return gpt, None
    msvq = MultiScaleVQ(32, vocab, VAR_SCALES).eval()
    return build_var(name, vocab_size=vocab, num_classes=num_classes, scales=VAR_SCALES, code_dim=32).eval(), msvq


def matmul_peak(n: int = 1536, repeats: int = 3) -> float:
    """GFLOP/s of the best of ``repeats`` n x n x n fp32 matmuls (this process, this moment)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def peak_fractions(flops: float, seconds: list[float], peaks: list[float]) -> list[float]:
    """Forward / peak per round, every round against the best peak of the whole run: a peak measured while another
    job shares the core reads low, and against its own round's peak a forward could pass 100 % (session 9, VAR-d16)."""
    best = max(peaks)
    return [flops / t / 1e9 / best for t in seconds]


def forward_flops(model, labels, sampling, msvq) -> float:
    """FLOPs of the forward passes of one generate: matmuls (FlopCounterMode) + attention (4 B H N T Dh)."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from decoding.ar import generate
    from generators import layers

    attn = [0.0]
    sdpa = F.scaled_dot_product_attention

    def counted(q, k, v, *args, **kwargs):
        attn[0] += 4 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]
        return sdpa(q, k, v, *args, **kwargs)

    total = [0.0]
    entry = {name: getattr(model, name) for name in ("prefill", "step")}

    def wrap(fn):
        def inner(*args, **kwargs):
            with FlopCounterMode(display=False) as counter:  # a counter resets when entered: one per call
                out = fn(*args, **kwargs)
            total[0] += counter.get_total_flops()
            return out
        return inner

    for name, fn in entry.items():
        setattr(model, name, wrap(fn))
    F.scaled_dot_product_attention = counted
    fused, layers.LINEAR_GELU = layers.LINEAR_GELU, None  # FlopCounterMode does not see oneDNN's fused fc1 + GELU
    try:
        generate(model, labels, sampling, torch.Generator().manual_seed(0), msvq)
    finally:
        F.scaled_dot_product_attention = sdpa
        layers.LINEAR_GELU = fused
        for name in entry:
            model.__dict__.pop(name, None)
    return total[0] + attn[0]


def hardware_limit(batch: int, rounds: int, vocab: int, only=None) -> tuple[list[dict], str]:
    """Per model: the new sampler (A) against the previous full-sort one (B), alternating over ``rounds``;
    the share of time outside the forward passes, forward GFLOP/s against a matmul peak of the same round."""
    import contextlib
    import resource

    import decoding.ar
    import generators.var
    from decoding.ar import generate
    from decoding.sampling import sample_from_logits
    from tests.test_forward_equivalence import reference_forward
    from tests.test_sampling_equivalence import ref_sample_from_logits

    # arm -> (sampler, forward): "prev_fwd" = the new sampler over the previous forward (tests/test_forward_equivalence.py)
    samplers = {"new": sample_from_logits, "old": ref_sample_from_logits, "prev_fwd": sample_from_logits}
    forwards = {"new": contextlib.nullcontext, "old": contextlib.nullcontext, "prev_fwd": reference_forward}

    def use(fn):  # both call sites of the sampler
        decoding.ar.sample_from_logits = fn
        generators.var.sample_from_logits = fn

    def tokens_of(out):
        return torch.cat([t.flatten(1) for t in out], 1) if isinstance(out, list) else out

    rows = []
    for name in only or LIMIT_DEFAULT:
        model, msvq = limit_model(name, vocab)
        labels = torch.arange(batch) % 1000
        flops = forward_flops(model, labels, LIMIT_SAMPLING, msvq)
        with reference_forward():  # VAR's previous head ran on the whole [cond; uncond] batch: more FLOPs
            flops_prev = forward_flops(model, labels, LIMIT_SAMPLING, msvq)
        timer = ForwardTimer(model, torch.device("cpu"))
        per = {k: {"total": [], "outside": [], "forward": []} for k in samplers}
        ratio, fwd_ratio, peaks, faults, same_tokens = [], [], [], [], True
        try:
            for k, fn in samplers.items():  # warm-up
                use(fn)
                with forwards[k]():
                    generate(model, labels, LIMIT_SAMPLING, torch.Generator().manual_seed(0), msvq)
            for r in range(rounds):
                order = list(samplers) if r % 2 == 0 else list(samplers)[::-1]
                peak = matmul_peak()
                tokens = {}
                for k in order:
                    use(samplers[k])
                    timer.seconds = 0.0
                    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    with forwards[k]():
                        t0 = time.perf_counter()
                        out, _ = generate(model, labels, LIMIT_SAMPLING, torch.Generator().manual_seed(r), msvq)
                        total = time.perf_counter() - t0
                    if k == "new":
                        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0)
                    tokens[k] = tokens_of(out)
                    per[k]["total"].append(total)
                    per[k]["outside"].append(1 - timer.seconds / total)
                    per[k]["forward"].append(timer.seconds)
                same_tokens &= torch.equal(tokens["new"], tokens["prev_fwd"])
                peak = max(peak, matmul_peak())  # the better of before and after the round
                peaks.append(peak)
                fwd_new = per["new"]["forward"][-1]
                ratio.append(per["old"]["total"][-1] / per["new"]["total"][-1])
                fwd_ratio.append(per["prev_fwd"]["forward"][-1] / fwd_new)
                print(f"{name} round {r}: new {per['new']['total'][-1]:.2f} s (outside "
                      f"{100 * per['new']['outside'][-1]:.1f} %), old sampler {per['old']['total'][-1]:.2f} s (outside "
                      f"{100 * per['old']['outside'][-1]:.1f} %), forward {flops / fwd_new / 1e9:.1f} GFLOP/s, "
                      f"previous forward {flops_prev / per['prev_fwd']['forward'][-1] / 1e9:.1f} GFLOP/s, "
                      f"peak {peak:.1f}",
                      flush=True)
        finally:
            use(sample_from_logits)
            for attr in ("prefill", "step"):
                model.__dict__.pop(attr, None)
        med = statistics.median
        best = max(peaks)
        frac_peak, frac_prev = (peak_fractions(f, per[k]["forward"], peaks)
                                for f, k in ((flops, "new"), (flops_prev, "prev_fwd")))
        rows.append({"name": name, "params": sum(p.numel() for p in model.parameters()), "flops": flops,
                     "flops_prev": flops_prev,
                     "outside_new": (med(per["new"]["outside"]), min(per["new"]["outside"]), max(per["new"]["outside"])),
                     "outside_old": (med(per["old"]["outside"]), min(per["old"]["outside"]), max(per["old"]["outside"])),
                     "speedup": (med(ratio), min(ratio), max(ratio)), "peak": best, "peaks": (min(peaks), max(peaks)),
                     "fwd_speedup": (med(fwd_ratio), min(fwd_ratio), max(fwd_ratio)), "same_tokens": same_tokens,
                     "frac_peak_prev": (med(frac_prev), min(frac_prev), max(frac_prev)),
                     "frac_peak": (med(frac_peak), min(frac_peak), max(frac_peak)),
                     "gflops": med(frac_peak) * best, "faults": med(faults)})
    return rows, limit_table(rows, batch, vocab)


def limit_table(rows: list[dict], batch: int, vocab: int) -> str:
    def rng(t, pct=False):
        f = (lambda x: f"{100 * x:.1f} %") if pct else (lambda x: f"{x:.2f}")
        return f"{f(t[0])} [{f(t[1])}–{f(t[2])}]"

    lines = [f"| model (batch {batch}, V {vocab}) | params | forward GFLOP / generate | outside forward passes, new "
             "sampler | outside, previous sampler | sampling speed-up new / previous | forward GFLOP/s | matmul "
             "peak GFLOP/s (best [per-round range]) | forward / peak | previous forward / peak | forward speed-up "
             "new / previous | same tokens as the previous forward | page faults / generate |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        flops, prev = round(r["flops"] / 1e9), round(r["flops_prev"] / 1e9)
        flops = f"{flops} (previous: {prev})" if prev != flops else f"{flops}"
        lines.append(f"| {r['name']} | {r['params'] / 1e6:.1f}M | {flops} | {rng(r['outside_new'], True)} | "
                     f"{rng(r['outside_old'], True)} | {rng(r['speedup'])} | {r['gflops']:.1f} | {r['peak']:.1f} "
                     f"[{r['peaks'][0]:.0f}–{r['peaks'][1]:.0f}] | "
                     f"{rng(r['frac_peak'], True)} | {rng(r['frac_peak_prev'], True)} | {rng(r['fwd_speedup'])} | "
                     f"{'yes' if r['same_tokens'] else 'no'} | {r['faults']:.0f} |")
    return "\n".join(lines)


def table(rows: list[dict], batch: int) -> str:
    head = (f"| generator (tokenizer) | params | tokens | train steps/s (batch {batch}) | sampling images/s "
            f"(tokens only) | images/s incl. decode | target forward passes / image | sampling time outside "
            "forward passes |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        passes = str(r["forward_passes"]) + (f" (+{r['head_calls']} flow-head calls)" if "head_calls" in r else "")
        lines.append(f"| {r['name']} ({r['tokenizer']}) | {r['params']} | {r['tokens']} | {r['train']:.2f} | "
                     f"{r['images_per_s']:.1f} | {r['images_per_s_decode']:.1f} | {passes} | "
                     f"{100 * r['outside']:.1f} % |")
    return "\n".join(lines)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, bf16 autocast"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores (load average {load:.1f} at "
            f"start), {torch.get_num_threads()} torch thread(s), torch {torch.__version__}, fp32")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for tiny models)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", nargs="*", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--hardware-limit", action="store_true",
                        help="VAR-d6 / GPT-d6 at cfg 1.5, top-k 900, top-p 0.96: time outside the forward passes "
                             "(new vs previous sampler) and forward GFLOP/s against a matmul peak (CPU)")
    parser.add_argument("--rounds", type=int, default=5, help="--hardware-limit: alternating A/B rounds")
    parser.add_argument("--vocab", type=int, default=4096, help="--hardware-limit: codebook size")
    parser.add_argument("--models", nargs="*", default=None, help=f"--hardware-limit: any of {', '.join(LIMIT_MODELS)} (default: {' '.join(LIMIT_DEFAULT)})")
    parser.add_argument("--default-malloc", action="store_true",
                        help="--hardware-limit: leave glibc malloc as it is (default: utils/heap.keep_freed_memory, "
                             "as sample.py on CPU)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.hardware_limit:
        return hardware_limit_main(args, argv)
    from generators.module import count_parameters

    started = machine(device)
    rows = []
    for gen in args.only:
        torch.manual_seed(args.seed)
        module, config = build(gen, device)
        tokens = config["model_args"].get("block_size") or getattr(module.model, "L", None)
        row = {"name": gen, "tokenizer": PAIRS[gen], "params": count_parameters(module.model), "tokens": tokens,
               "train": train_speed(module, config, args.batch_size, args.train_steps, device)}
        row.update(sample_speed(module, config, args.batch_size, args.repeats, device))
        rows.append(row)
        print(f"{gen}: {row}", flush=True)
    text = table(rows, args.batch_size)
    command = "python benchmarks/generators.py " + " ".join(sys.argv[1:] if argv is None else argv)
    section = (f"\n## Generators\n\n`{command.strip()}`, {datetime.date.today().isoformat()}, seed {args.seed}, "
               f"{started}.\nDemo-size networks (configs/generator/*.yaml) on untrained demo tokenizers "
               f"(fsq / msvq / kl, f4, 32x32 gray, 10 classes); sampling with each generator's default settings "
               f"(CFG on: batch {args.batch_size} runs as {2 * args.batch_size}), medians of {args.repeats} after "
               "one warm-up call. Forward passes are sequential batched calls of the network per image; the "
               "outside share is sampling time not spent inside those calls.\n\n" + text + "\n")
    print(section)
    if args.append:
        results = ROOT / "benchmarks" / "RESULTS.md"
        if not results.exists():
            results.write_text("# Benchmark results\n")
        with open(results, "a") as f:
            f.write(section)
        print(f"appended to {results}")
    return 0


def hardware_limit_main(args, argv) -> int:
    from benchmarks.common import machine as machine_line, report

    from utils.heap import keep_freed_memory

    torch.manual_seed(args.seed)
    heap = "glibc malloc as it is" if args.default_malloc else (
        "glibc malloc reusing freed memory (utils/heap.py, as sample.py on CPU)" if keep_freed_memory()
        else "glibc malloc as it is (not glibc)")
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    rows, text = hardware_limit(args.batch_size, args.rounds, args.vocab, args.models)
    command = "python benchmarks/generators.py " + " ".join(sys.argv[1:] if argv is None else argv)
    section = (f"## Sampling at the hardware limit\n\n`{command.strip()}`, {datetime.date.today().isoformat()}, seed "
               f"{args.seed}, {machine_line()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}, "
               f"fp32, CPU, {heap}; load average {load:.1f} at start and {os.getloadavg()[0]:.1f} at the end (other jobs "
               f"share the machine), wall {time.perf_counter() - t0:.0f} s.\n"
               f"Random weights; VAR-d6 (and VAR-d16: 16 layers x 1024) on a {args.vocab}-code msvq with VAR's 256 px scales {list(VAR_SCALES)} "
               f"(680 tokens), GPT-d6 = 6 layers x 384 on a 16x16 grid (256 tokens, LlamaGen blocks); sampling "
               f"{LIMIT_SAMPLING} (CFG: batch {args.batch_size} runs as {2 * args.batch_size}). Per round, three arms "
               f"each run one whole generate (the order reversed every other round): the new sampler and forward, "
               f"the previous full-sort sampler (tests/test_sampling_equivalence.py), and the new sampler over the "
               f"previous forward (tests/test_forward_equivalence.py; the column says whether its tokens equal the "
               f"first arm's for the same seed: rounding differences can flip a draw); {args.rounds} rounds, median "
               f"[min–max]. Outside = 1 - (time inside prefill/step) / total. Forward GFLOP/s = FLOPs counted in "
               f"each arm's own forward (matmuls by FlopCounterMode, attention 4 B H N T Dh; VAR's guided head runs on B "
               f"rows, the previous one on 2B) / time inside prefill/step; peak = the best 1536^3 fp32 matmul "
               f"of the whole run (measured before and after every round in the same process; the column gives "
               f"it with the range of the per-round readings), every round's forward against it. Page faults: "
               f"minor faults (getrusage) during the first arm's generate.\n\n" + text + "\n")
    report(section, args.append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
