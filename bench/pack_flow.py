"""Benchmark workflow of bench/pack_slurm.py (issue 7): prepare -> square[N] -> total, packing set by env.

BENCH_PACK is ``elements_per_job`` of square (an int or ``auto``, default 1);
BENCH_INLINE is ``inline`` of all three tasks (0, 1 or auto, default 0).
"""

import os
from typing import Annotated

from reflow import Result, Workflow

PACK = os.environ.get("BENCH_PACK", "1")
ELEMENTS_PER_JOB = PACK if PACK == "auto" else int(PACK)
INLINE = {"0": False, "1": True, "auto": "auto"}[os.environ.get("BENCH_INLINE", "0")]

wf = Workflow("benchpk")


@wf.job(time="00:10:00", mem="200M", inline=INLINE)
def prepare(n: int = 10) -> list[int]:
    """Return 0..n-1."""
    return list(range(n))


@wf.job(array=True, time="00:10:00", mem="200M", elements_per_job=ELEMENTS_PER_JOB, inline=INLINE)
def square(x: Annotated[int, Result(step="prepare")]) -> int:
    """Square one element."""
    return x * x


@wf.job(time="00:10:00", mem="200M", inline=INLINE)
def total(values: Annotated[list[int], Result(step="square")]) -> int:
    """Sum the squares."""
    return sum(values)


if __name__ == "__main__":
    raise SystemExit(wf.cli())
