"""CEL building blocks for the expressions the API server evaluates for mig-guard (webhook
`matchConditions` and the ValidatingAdmissionPolicy), kept to a bounded cost.

The API server stops a CEL expression that runs past its cost limit and treats that as an error
(with failurePolicy Fail: the write is refused). Scanning every label of a Node costs in
proportion to the number of labels, so it is done only on maps of at most `LARGE_MAP_ENTRIES`
entries; the keys mig-guard reads are looked up directly (constant cost), and a larger map sends
the request to the webhook instead of being scanned. Notes: `metadata.labels`/`annotations` are
absent when empty (hence `has()`), `oldObject` is null on CREATE (hence the operation test
first), and fields of `request` that are empty are absent too (`request.name` on a collection
delete, `request.userInfo.extra`).
"""

from __future__ import annotations

from collections.abc import Iterable

# A Node with more labels (or annotations) than this is sent to the webhook on every write rather
# than scanned in CEL: 1,000 entries keep a scan far below the API server's per-expression cost
# limit (measured: the limit is hit at about 60,000 labels), and real nodes carry a few hundred.
LARGE_MAP_ENTRIES = 1000

NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"


def quote(text: str) -> str:
    """A CEL string literal for `text` (names and keys only: no quote or backslash expected)."""
    if "'" in text or "\\" in text or "\n" in text:
        raise ValueError(f"unexpected quote, backslash or newline in {text!r}")
    return f"'{text}'"


def string_list(items: Iterable[str]) -> str:
    return "[" + ", ".join(quote(i) for i in items) + "]"


def has_key(obj: str, field: str, key: str) -> str:
    """`key` is in `obj.metadata.<field>` (False when the map is absent)."""
    return f"(has({obj}.metadata.{field}) && {quote(key)} in {obj}.metadata.{field})"


def key_changed(field: str, key: str) -> str:
    """UPDATE: `key` was added, removed or changed in `metadata.<field>` (constant cost)."""
    new, old = has_key("object", field, key), has_key("oldObject", field, key)
    k = quote(key)
    return f"({new} != {old} || ({new} && object.metadata.{field}[{k}] != oldObject.metadata.{field}[{k}]))"


def large(obj: str, field: str) -> str:
    return f"(has({obj}.metadata.{field}) && size({obj}.metadata.{field}) > {LARGE_MAP_ENTRIES})"


def prefix_set(field: str, prefix: str) -> str:
    """CREATE: some key of `metadata.<field>` starts with `prefix` (a scan: guard with `large`)."""
    new = f"object.metadata.{field}"
    return f"(has({new}) && {new}.exists(k, k.startsWith({quote(prefix)})))"


def prefix_changed(field: str, prefix: str) -> str:
    """UPDATE: a key starting with `prefix` was added, removed or changed (a scan: guard with `large`)."""
    new, old = f"object.metadata.{field}", f"oldObject.metadata.{field}"
    p = quote(prefix)
    added_or_changed = (
        f"(has({new}) && {new}.exists(k, k.startsWith({p}) && "
        f"!(has({old}) && k in {old} && {old}[k] == {new}[k])))"
    )
    removed = f"(has({old}) && {old}.exists(k, k.startsWith({p}) && !(has({new}) && k in {new})))"
    return f"({added_or_changed} || {removed})"


def any_of(parts: Iterable[str]) -> str:
    return "(" + " || ".join(parts) + ")"


def bound_node_is(name_expression: str) -> str:
    """The request's credential is bound to the node `name_expression` (a pod-bound ServiceAccount
    token of a pod on that node carries its name in `userInfo.extra`)."""
    key = quote(NODE_NAME_EXTRA)
    return (
        f"(has(request.userInfo.extra) && {key} in request.userInfo.extra && "
        f"request.userInfo.extra[{key}] == [{name_expression}])"
    )


def bound_to_a_node() -> str:
    key = quote(NODE_NAME_EXTRA)
    return f"(has(request.userInfo.extra) && {key} in request.userInfo.extra)"


def literal(value: bool) -> str:
    return "true" if value else "false"
