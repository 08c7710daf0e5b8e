"""Benchmark workflow shared by reflow.py and reflow-hpc: prepare -> square[N] -> total."""

from typing import Annotated

from reflow import Result, Workflow

wf = Workflow("bench")


@wf.job(time="00:10:00", mem="200M")
def prepare(n: int = 10) -> list[int]:
    """Return 0..n-1."""
    return list(range(n))


@wf.job(array=True, time="00:10:00", mem="200M")
def square(x: Annotated[int, Result(step="prepare")]) -> int:
    """Square one element."""
    return x * x


@wf.job(time="00:10:00", mem="200M")
def total(values: Annotated[list[int], Result(step="square")]) -> int:
    """Sum the squares."""
    return sum(values)


if __name__ == "__main__":
    raise SystemExit(wf.cli())
