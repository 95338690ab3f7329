"""Regenerate every benchmark table: `python benchmarks/run_all.py [--quick]`.

Writes JSON under `benchmarks/results/` and prints the markdown tables to paste into
`benchmarks/RESULTS.md` (with the machine description printed first).
"""

import sys

import bench_memory
import bench_step
from _common import machine

if __name__ == "__main__":
    quick = ["--quick"] if "--quick" in sys.argv else []
    print(machine())
    print("\n## Training step\n")
    bench_step.main(quick)
    print("\n## Memory of saved trajectories\n")
    bench_memory.main(quick)
