"""`kubectl mig`: see MIG layouts, and what a change would do, before changing anything.

A kubectl plugin (the `kubectl-mig` console script on PATH is found by `kubectl mig`), reading
the current kubeconfig and context. It writes nothing: `status`, `plan`, `configs` and `why` read
Nodes, the mig-parted ConfigMap and Events, and judge and plan with the code the webhook and the
reconciler run.
"""
