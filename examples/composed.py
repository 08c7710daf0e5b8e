"""Compose a reusable Flow twice under two prefixes, then combine both branches.

    python examples/composed.py run --run-dir /tmp/composed --words alpha beta gamma
    python examples/composed.py dag --format mermaid
"""

from reflow import Flow, Result, Workflow

# A reusable flow: normalise words, then count their letters.
text = Flow("text")


@text.job()
def normalise(words: list[str]) -> list[str]:
    """Lower-case and strip every word."""
    return [w.strip().lower() for w in words]


@text.array_job()
def count(word: str = Result(step="normalise")) -> int:
    """Count the letters of one word."""
    return sum(ch.isalpha() for ch in word)


wf = Workflow("composed")
wf.include(text, prefix="first")    # tasks first_normalise, first_count
wf.include(text, prefix="second")   # tasks second_normalise, second_count


@wf.job()
def report(a: list[int] = Result(step="first_count"), b: list[int] = Result(step="second_count")) -> dict:
    """Compare the letter counts of both branches."""
    return {"first": sum(a), "second": sum(b), "same": sum(a) == sum(b)}


if __name__ == "__main__":
    raise SystemExit(wf.cli())
