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
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
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


if __name__ == "__main__":
    sys.exit(main())
