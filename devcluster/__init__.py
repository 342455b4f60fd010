"""A real local Kubernetes control plane (etcd, kube-apiserver, ...) for tests and the demo."""
