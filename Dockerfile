# syntax=docker/dockerfile:1
# One image for every mig-guard component; the entry point is the `mig-guard` CLI
# (webhook, reconcile, certs, ...). Build from the repository root:
#   docker build -t mig-guard:0.1.0 .
#
# Base image pinned by version tag. For reproducible builds pin the digest as well, e.g.
#   docker buildx imagetools inspect python:3.11.14-slim-bookworm   # -> sha256:...
#   docker build --build-arg PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:<digest> .
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---- build: make a wheel of the project and install it with its dependencies into a venv ----------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Dependencies (all published as binary wheels for linux/amd64 and arm64: no compiler needed).
COPY pyproject.toml README.md ./
COPY migcore/ migcore/
COPY kube/ kube/
COPY webhook/ webhook/
COPY reconciler/ reconciler/
COPY certs/ certs/
COPY devcluster/ devcluster/
COPY mig_guard/ mig_guard/
RUN python -m venv /opt/mig-guard \
 && /opt/mig-guard/bin/pip install --upgrade "pip>=24" "setuptools>=69" wheel \
 && /opt/mig-guard/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/mig-guard/bin/pip install --only-binary=:all: /wheels/mig_guard-*.whl \
 && /opt/mig-guard/bin/pip uninstall --yes pip setuptools wheel \
 && /opt/mig-guard/bin/python -m compileall -q /opt/mig-guard/lib \
 && /opt/mig-guard/bin/mig-guard --help > /dev/null

# ---- runtime: the same Python base, the venv, nothing else (no compilers, no pip) ---------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="mig-guard" \
      org.opencontainers.image.description="Safe NVIDIA MIG layout changes on Kubernetes" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/mig-guard/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /opt/mig-guard /opt/mig-guard
# Name uid 65532 (group 65532): the kubelet hands a container runtime only the image's numeric uid,
# and the runtime takes the group from /etc/passwd, so without this entry a pod that sets no
# runAsGroup ran with gid 0 (found on a real node).
RUN echo "mig-guard:x:65532:65532:mig-guard:/nonexistent:/usr/sbin/nologin" >> /etc/passwd \
 && echo "mig-guard:x:65532:" >> /etc/group
# Non-root by default (the webhook and the certs Jobs); the chart runs only the reconciler as root,
# because MIG reconfiguration needs the GPU devices. Works with a read-only root filesystem: the
# only writes go to /tmp (an emptyDir in the chart).
USER 65532:65532
ENTRYPOINT ["mig-guard"]
CMD ["--help"]
