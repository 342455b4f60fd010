"""Hypothesis strategies for hostile AdmissionReview bodies (shared by the app and server fuzzers)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st
from webhook_harness import gfd_labels, node, review

from migcore import keys

JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=50)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
WEIRD_STRINGS = st.one_of(
    st.text(max_size=80),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=200, max_size=3000),
    st.sampled_from(
        ["", " ", "all-1g.5gb\n", "all-1g.5gb\x00", "ALL-1G.5GB", "../../etc", "'; DROP", "\u202e"]
    ),
    st.sampled_from(["all-1g.5gb", "all-7g.40gb", "all-3g.40gb", "all-disabled", "all-1g.5gbb"]),
)
LABEL_KEYS = st.sampled_from(
    [
        keys.LABEL_MIG_CONFIG,
        keys.LABEL_MIG_STATE,
        keys.LABEL_GPU_PRODUCT,
        keys.LABEL_GPU_COUNT,
        "mig-guard.io/x",
    ]
)
ANNOTATION_KEYS = st.sampled_from(
    [keys.ANNOTATION_GPUS, keys.ANNOTATION_HOLD, keys.ANNOTATION_REASON, "other"]
)
# Paths into a valid review where a hostile value is planted.
PLANT_PATHS = [
    (),
    ("request",),
    ("request", "uid"),
    ("request", "kind"),
    ("request", "kind", "kind"),
    ("request", "kind", "group"),
    ("request", "operation"),
    ("request", "userInfo"),
    ("request", "userInfo", "username"),
    ("request", "userInfo", "groups"),
    ("request", "object"),
    ("request", "oldObject"),
    ("request", "dryRun"),
    ("request", "object", "metadata"),
    ("request", "object", "metadata", "name"),
    ("request", "object", "metadata", "labels"),
    ("request", "object", "metadata", "annotations"),
    ("request", "object", "spec"),
    ("request", "object", "spec", "taints"),
    ("request", "object", "spec", "unschedulable"),
    ("apiVersion",),
    ("kind",),
]


def _plant(doc: dict[str, Any], path: tuple[str, ...], value: Any) -> Any:
    if not path:
        return value
    target: Any = doc
    for part in path[:-1]:
        if not isinstance(target, dict):
            return doc
        target = target.setdefault(part, {})
    if isinstance(target, dict):
        target[path[-1]] = value
    return doc


@st.composite
def plausible_reviews(draw: st.DrawFn) -> Any:
    """A review of a Node with odd labels/annotations, then maybe one field replaced by junk."""
    labels = {**gfd_labels(), **draw(st.dictionaries(LABEL_KEYS, WEIRD_STRINGS, max_size=4))}
    old_labels = {**gfd_labels(), **draw(st.dictionaries(LABEL_KEYS, WEIRD_STRINGS, max_size=3))}
    annotations = draw(
        st.dictionaries(ANNOTATION_KEYS, WEIRD_STRINGS | JSON_VALUES.map(json.dumps), max_size=3)
    )
    operation = draw(st.sampled_from(["CREATE", "UPDATE", "DELETE", "CONNECT", "PATCH"]))
    new = node(labels=labels, annotations=annotations, unschedulable=draw(st.none() | st.booleans()))
    old = None if operation == "CREATE" else node(labels=old_labels)
    doc = review(
        new, old, operation=operation, uid=draw(st.text(min_size=1, max_size=40)), user=draw(WEIRD_STRINGS)
    )
    if draw(st.booleans()):
        doc = _plant(doc, draw(st.sampled_from(PLANT_PATHS)), draw(JSON_VALUES | WEIRD_STRINGS))
    return doc


def bodies() -> st.SearchStrategy[bytes]:
    """Request bodies: plausible-but-hostile reviews, arbitrary JSON, arbitrary bytes, deep nesting."""
    return st.one_of(
        plausible_reviews().map(lambda d: json.dumps(d).encode()),
        JSON_VALUES.map(lambda d: json.dumps(d).encode()),
        st.binary(max_size=300),
        st.integers(min_value=1, max_value=200_000).map(lambda n: b"[" * n + b"]" * (n % 3)),
        st.integers(min_value=1, max_value=50_000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    )


def sent_review(body: bytes) -> Any:
    """The decoded body when it is a dict with a string uid (what a 200 answer must echo)."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None
