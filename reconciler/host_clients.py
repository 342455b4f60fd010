"""Host GPU clients: systemd services on the host that hold the GPUs open (DCGM, NVSM, nv_peer_mem,
...) and so block a GPU reset or a MIG change. With a driver installed on the host, the GPU
Operator's mig-manager stops the services its clients ConfigMap lists (`default-gpu-clients`,
key `clients.yaml`), and kubelet too when a MIG mode changes, and starts them again on every
exit. The reconciler does the same, as a step of the change (`reconciler.change`): the services
it stops are in the change's record before they are stopped, so an agent killed in between
starts them when it comes back.

The ConfigMap's format (the operator's `0410_configmap.yaml`):

    version: v1
    systemd-services:
      - nvsm.service
      - nvidia-dcgm.service
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client as k8s

from kube.errors import API_ERRORS, describe, is_not_found
from reconciler.driver import DriverInfo
from reconciler.host import HostCommandError, HostRoot

log = logging.getLogger(__name__)

CLIENTS_KEY = "clients.yaml"
DEFAULT_CLIENTS_CONFIGMAP = "default-gpu-clients"
DEFAULT_KUBELET_SERVICE = "kubelet.service"


class HostClientsMode(enum.StrEnum):
    AUTO = "auto"  # when the GPU Operator's marker says the driver is installed on the host
    ON = "on"
    OFF = "off"


class HostClientsError(Exception):
    """A service could not be stopped, or the clients list could not be read; the message says which."""


def parse_gpu_clients(text: str) -> tuple[str, ...]:
    """The systemd units of a clients list in the operator's format; raises HostClientsError
    naming what is wrong."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise HostClientsError(f"the GPU clients list is not YAML: {exc}") from exc
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise HostClientsError("the GPU clients list must be a mapping with version and systemd-services")
    version = raw.get("version", "v1")
    if version != "v1":
        raise HostClientsError(f"the GPU clients list has version {version!r}; only v1 is known")
    units = raw.get("systemd-services") or []
    if not isinstance(units, list) or not all(isinstance(u, str) and u.strip() for u in units):
        raise HostClientsError("systemd-services in the GPU clients list must be a list of unit names")
    bad = [u for u in units if u.startswith("-") or any(c.isspace() for c in u)]
    if bad:
        raise HostClientsError(f"not a systemd unit name: {', '.join(bad)}")
    return tuple(dict.fromkeys(u.strip() for u in units))


@dataclass
class FileClients:
    """The clients list in a file (`--gpu-clients-file`)."""

    path: Path

    def text(self) -> str | None:
        try:
            return self.path.read_text()
        except FileNotFoundError:
            return None

    def describe(self) -> str:
        return str(self.path)


@dataclass
class ConfigMapClients:
    """The clients list in a ConfigMap of the operands' namespace (read fresh for each change)."""

    api: Any
    namespace: Callable[[], str]
    name: str = DEFAULT_CLIENTS_CONFIGMAP

    def text(self) -> str | None:
        """The list (None: no such ConfigMap). Raises HostClientsError when it cannot be read: no
        host service is stopped on a guess, and the change does not go ahead with them running."""
        try:
            cm = k8s.CoreV1Api(self.api).read_namespaced_config_map(self.name, self.namespace())
        except API_ERRORS as exc:
            if is_not_found(exc):
                return None
            raise HostClientsError(
                f"could not read the host GPU clients list ({self.describe()}): {describe(exc)}; the chart's "
                "Role in the operands' namespace grants it (reconciler.operatorRbac), or set "
                "reconciler.hostGpuClients.mode=off"
            ) from exc
        return str((cm.data or {}).get(CLIENTS_KEY, ""))

    def describe(self) -> str:
        return f"ConfigMap {self.namespace()}/{self.name}"


@dataclass
class HostClients:
    """The host's GPU clients: which to stop for a change, stopping and starting them."""

    host: HostRoot
    source: FileClients | ConfigMapClients | None = None
    mode: HostClientsMode = HostClientsMode.AUTO
    driver: DriverInfo = field(default_factory=DriverInfo)
    kubelet_service: str = DEFAULT_KUBELET_SERVICE

    def enabled(self) -> bool:
        if self.mode is HostClientsMode.AUTO:
            return self.driver.host_driver is True
        return self.mode is HostClientsMode.ON

    def listed(self, mode_change: bool) -> list[str]:
        """The units to stop for a change: the list's, and kubelet when a MIG mode changes (its
        device manager holds the GPUs open, which blocks the reset)."""
        units: list[str] = []
        if self.source is not None:
            text = self.source.text()
            if text is None:
                log.info("no GPU clients list at %s: no host service is stopped", self.source.describe())
            else:
                units = list(parse_gpu_clients(text))
        if mode_change and self.kubelet_service:
            units.append(self.kubelet_service)
        return list(dict.fromkeys(units))

    def running(self, units: Sequence[str]) -> list[str]:
        """Those of `units` that are active now (only they are stopped, and started again)."""
        out: list[str] = []
        for unit in units:
            done = self.host.run(["systemctl", "is-active", unit], check=False)
            if done.returncode not in (0, 3):  # 3: inactive, failed or no such unit
                problem = " ".join((done.stderr or done.stdout).split()) or f"exit {done.returncode}"
                raise HostClientsError(f"could not ask the host's systemd whether {unit} runs: {problem}")
            if done.stdout.strip() in ("active", "activating", "reloading"):
                out.append(unit)
        return out

    def stop(self, units: Sequence[str]) -> None:
        """Stop each unit; raises HostClientsError at the first that cannot be stopped."""
        for unit in units:
            try:
                self.host.run(["systemctl", "stop", unit])
            except HostCommandError as exc:
                raise HostClientsError(f"could not stop the host GPU client {unit}: {exc}") from exc
            log.info("stopped host GPU client %s", unit)

    def start(self, units: Sequence[str]) -> list[str]:
        """Start each unit (kubelet last); returns what could not be started, one sentence each."""
        problems: list[str] = []
        ordered = [u for u in units if u != self.kubelet_service] + [
            u for u in units if u == self.kubelet_service
        ]
        for unit in ordered:
            try:
                self.host.run(["systemctl", "start", unit])
                log.info("started host GPU client %s", unit)
            except HostCommandError as exc:
                problems.append(f"host GPU client {unit} was not started again: {exc}")
        return problems
