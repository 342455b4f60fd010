"""How mig-guard words things for people: names cut to fit a message, GPU index ranges, short
lists of names. One spelling each, so that the CLI, the webhook and the reconciler say the same."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence


def shorten(text: str, limit: int) -> str:
    """`text` cut to `limit` characters at a word boundary, with an ellipsis when cut."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    space = cut.rfind(" ")
    if space > limit // 2:
        cut = cut[:space]
    return cut.rstrip(" ,;:") + "…"


def index_ranges(indexes: Iterable[int]) -> str:
    """`0-3,6`: GPU indexes (sorted, each once) in runs, for one-line messages."""
    out: list[str] = []
    for _, group in itertools.groupby(enumerate(sorted(set(indexes))), lambda pair: pair[1] - pair[0]):
        run = [i for _, i in group]
        out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ",".join(out)


def gpus_text(indexes: Sequence[int]) -> str:
    """`GPU 3` or `GPUs 0-3,6`."""
    return ("GPU " if len(set(indexes)) == 1 else "GPUs ") + index_ranges(indexes)


def names_text(names: Sequence[str], shown: int) -> str:
    """`a, b, c and 4 more`: the first `shown` names, and how many more there are."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def age_text(seconds: float) -> str:
    """`45s`, `12m`, `5h`, `3d`: how long ago, the way kubectl shows ages."""
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    if s < 2 * 3600:
        return f"{s // 60}m"
    if s < 2 * 86400:
        return f"{s // 3600}h"
    return f"{s // 86400}d"
