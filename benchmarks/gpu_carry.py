"""Mirror the runs a lent-GPU session times into .gpu/root/<absolute path>, for benchmarks/gpu_session.sh.

    python benchmarks/gpu_carry.py outputs/bench_gpt/generator /work/runs/lantern/bench_drafter ...

The device machine gets a copy of the working tree only, while a run's config.yaml records the absolute paths of
the runs it depends on (a generator its tokenizer, a draft head or a student its generator). So each named run and,
following those recorded paths, every run it depends on is copied to .gpu/root/<its absolute path>, with only its
top-level files (model.safetensors, config.yaml, metrics.json, neighbour tables: no checkpoints/, token caches or
pairs); gpu_session.sh links each back to its recorded path. A run recorded under a path that is a symlink here is
listed in .gpu/aliases. Prints the size carried (the working tree and the carried paths travel in 64 MiB).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MAX_FILE = 32 * 2**20  # a top-level file above this is not a weight or table the timing needs


def referenced_runs(config: object):
    """Every string in a run's config that names another run folder (a folder holding config.yaml)."""
    if isinstance(config, dict):
        for value in config.values():
            yield from referenced_runs(value)
    elif isinstance(config, list):
        for value in config:
            yield from referenced_runs(value)
    elif isinstance(config, str) and config.startswith("/") and (Path(config) / "config.yaml").is_file():
        yield Path(config)


def mirror(runs: list[Path], dest: Path) -> int:
    """Copy runs and their dependencies under dest/root; write dest/aliases; return the bytes copied."""
    todo, seen, aliases, total = [p.absolute() for p in runs], set(), [], 0
    while todo:
        run = todo.pop()
        if run in seen:
            continue
        seen.add(run)
        if not (run / "config.yaml").is_file():
            raise SystemExit(f"{run} holds no config.yaml: not a finished tokar run (train it first)")
        real = run.resolve()
        if real != run:  # recorded under a symlink: carry the real folder, link the recorded path to it
            aliases.append(f"{run} {real}")  # gpu_session.sh links real first
            todo.append(real)
            continue
        target = dest / "root" / str(run).lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        for f in run.iterdir():
            if f.is_file() and f.stat().st_size <= MAX_FILE:
                shutil.copy2(f, target / f.name)
                total += f.stat().st_size
        todo.extend(referenced_runs(yaml.safe_load((run / "config.yaml").read_text())))
    (dest / "aliases").write_text("".join(a + "\n" for a in aliases))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--dest", type=Path, default=ROOT / ".gpu")
    args = parser.parse_args()
    if args.dest.exists():
        shutil.rmtree(args.dest)
    total = mirror(args.runs, args.dest)
    print(f"carried {total / 2**20:.1f} MiB in {args.dest}", file=sys.stderr)
    os.sync()


if __name__ == "__main__":
    main()
