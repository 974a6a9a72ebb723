"""What every benchmark script shares: where results go and how the machine is described."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
RESULTS_HEADER = """# tokar benchmark results

Numbers measured with the scripts in `benchmarks/`, following ../shared/BENCHMARKING.md: speed as
ratios measured within one process (alternating A/B rounds after warm-up, median with min-max),
absolute times only from a GPU unless labelled indicative, and every section carries the command,
date, machine, library versions and seed that produced it. Each section is appended by the script
named in it; later runs add new sections rather than editing old ones.
"""


def nproc() -> str:
    try:
        # --all: plain nproc honours OMP_NUM_THREADS, which benchmarks set to pin their own threads
        return subprocess.run(["nproc", "--all"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return str(os.cpu_count())


def machine() -> str:
    """e.g. 'nproc 2, AMD EPYC ..., Linux x86_64'."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"nproc {nproc()}, {model}, {platform.system()} {platform.machine()}"


def report(text: str, append: bool) -> None:
    """Print a result section; with append, add it to benchmarks/RESULTS.md (created with its header if missing)."""
    print("\n" + text)
    if not append:
        return
    if not RESULTS.exists():
        RESULTS.write_text(RESULTS_HEADER)
    with RESULTS.open("a") as f:
        f.write("\n" + text)
    print(f"appended to {RESULTS}")
