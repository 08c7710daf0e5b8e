"""Path outputs, the cache and verify.

Run it twice: the second run is all cache hits.  Delete a chunk file and run
with --verify: only the missing chunk (and what depends on it) is recomputed.

    python examples/files.py run --run-dir /tmp/files --chunks 4
    python examples/files.py run --run-dir /tmp/files --chunks 4            # cache hits
    rm /tmp/files/chunk-2.txt
    python examples/files.py run --run-dir /tmp/files --chunks 4 --verify   # chunk 2 again
"""

from pathlib import Path

from reflow import Result, RunDir, Workflow

wf = Workflow("files")


@wf.job()
def plan(chunks: int = 4) -> list[int]:
    """Return the chunk numbers to produce."""
    return list(range(chunks))


@wf.job(array=True)
def write_chunk(number: int = Result(step="plan"), run_dir: RunDir = None) -> Path:
    """Write one chunk file and return its path (checked by --verify on a cache hit)."""
    path = Path(run_dir) / f"chunk-{number}.txt"
    path.write_text("".join(f"{number}:{i}\n" for i in range(1000)))
    return path


@wf.job(verify=lambda out: Path(out).exists())
def merge(parts: list[Path] = Result(step="write_chunk"), run_dir: RunDir = None) -> Path:
    """Concatenate every chunk into one file."""
    target = Path(run_dir) / "merged.txt"
    target.write_text("".join(Path(p).read_text() for p in parts))
    return target


if __name__ == "__main__":
    raise SystemExit(wf.cli())
