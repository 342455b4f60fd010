"""TypedDicts for the AdmissionReview `admission.k8s.io/v1` wire format.

Only the fields mig-guard reads or writes; the API server sends more. Kept apart from the
parsing so the shape of the protocol is visible in one place.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict

API_VERSION: Literal["admission.k8s.io/v1"] = "admission.k8s.io/v1"
KIND: Literal["AdmissionReview"] = "AdmissionReview"


class GroupVersionKindWire(TypedDict):
    group: str
    version: str
    kind: str


class UserInfoWire(TypedDict, total=False):
    username: str
    uid: str
    groups: list[str]
    extra: dict[str, list[str]]


class AdmissionRequestWire(TypedDict):
    uid: str
    kind: GroupVersionKindWire
    operation: str
    userInfo: UserInfoWire
    subResource: NotRequired[str]
    name: NotRequired[str]
    namespace: NotRequired[str]
    object: NotRequired[dict[str, Any] | None]
    oldObject: NotRequired[dict[str, Any] | None]
    dryRun: NotRequired[bool]


class StatusWire(TypedDict):
    code: int
    message: str
    reason: NotRequired[str]


class AdmissionResponseWire(TypedDict):
    uid: str
    allowed: bool
    status: NotRequired[StatusWire]
    warnings: NotRequired[list[str]]
    patchType: NotRequired[Literal["JSONPatch"]]
    patch: NotRequired[str]


class AdmissionReviewResponseWire(TypedDict):
    apiVersion: Literal["admission.k8s.io/v1"]
    kind: Literal["AdmissionReview"]
    response: AdmissionResponseWire


# One RFC 6902 operation as mig-guard emits it (add / replace / test only).
class PatchOperation(TypedDict):
    op: Literal["add", "replace", "remove", "test"]
    path: str
    value: NotRequired[Any]
