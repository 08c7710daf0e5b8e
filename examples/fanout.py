"""Fan-out / gather: prepare a list, square every element as an array task, sum.

    python examples/fanout.py submit --executor local --run-dir /tmp/fanout --n 20 --wait
    python examples/fanout.py run --run-dir /tmp/fanout --n 20      # in-process
    python reflow.py status <run_id>                                 # from the store alone
"""

from typing import Annotated

from reflow import Param, Result, Workflow

wf = Workflow("fanout")


@wf.job(time="00:05:00", mem="1G")
def prepare(n: Annotated[int, Param(help="how many numbers to square")] = 10) -> list[int]:
    """Return the numbers 0..n-1."""
    return list(range(n))


@wf.job(array=True, cpus=1, time="00:05:00", mem="1G", array_parallelism=8)
def square(x: int = Result(step="prepare"),
           offset: Annotated[int, Param(help="added to every square", namespace="local")] = 0) -> int:
    """Square one element (one array element per number)."""
    return x * x + offset


@wf.job(time="00:05:00", mem="1G")
def total(values: list[int] = Result(step="square")) -> int:
    """Gather the squares and add them up."""
    return sum(values)


if __name__ == "__main__":
    raise SystemExit(wf.cli())
