"""The Kubernetes plumbing the webhook and the reconciler share (the middle layer): the API client
and its error classes, one watch helper, a typed view of a Node, and the mig-parted config source
(a file or a ConfigMap). It knows the Kubernetes API and the domain core (`migcore`), never the
webhook, the reconciler or the CLI (import-linter contracts in pyproject.toml)."""
