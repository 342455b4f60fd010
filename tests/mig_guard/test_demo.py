"""`mig-guard demo` end to end: the README's run command, scripted part only (`--no-wait`)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest


@pytest.mark.cluster
@pytest.mark.workloads
def test_demo_shows_rejections_and_a_successful_change_then_cleans_up() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mig_guard.cli", "demo", "--no-wait"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    # 1. the typo is refused by the API server, with suggestions
    assert 'denied the request: nvidia.com/mig.config="all-1g.5gbb" is not a config' in out
    assert "did you mean all-1g.5gb" in out
    # 2. the A30 cannot hold 3g.20gb, and the message says what it has
    assert "3g.20gb does not exist on A30-24GB" in out
    # 3. dry run: accepted and nothing stored (step 4 then sees a fresh change)
    assert "node/gpu-a100 labeled (server dry run)" in out
    # 4. pending and tainted right after the write, success with the taint gone at the end
    assert "right after the write: state=pending, tainted=True" in out
    assert "now: state=success, tainted=False" in out
    # 5. the geometry all-balanced asks for, on all 8 GPUs
    step5 = out.split("5. The geometry on gpu-a100 now", 1)[-1].split("6. A GPU no catalog knows", 1)[0]
    geometry = re.findall(r"^\s+GPU \d: (.*)", step5, re.MULTILINE)
    assert geometry == ["2g.10gb@0, 1g.5gb@2, 1g.5gb@3, 3g.20gb@4"] * 8, out
    # 6. a GPU no catalog knows: refused exactly by its driver's table, then a layout it holds applied
    assert "gpu-x100: 2 x NVIDIA-X100 (in no catalog: simulated from its driver's MIG table)" in out
    assert "3g.48gb x3 needs 3 GPU instances; NVIDIA X100 (driver table) allows at most 2 of 3g.48gb" in out
    assert re.findall(r"gpu-x100 GPU \d: (.*)", out) == ["3g.48gb@0, 3g.48gb@3"] * 2, out
    # 8-12. see before you change: the pods on each MIG device, kubectl mig, the webhook's warnings
    # on a dry run, then the change evicting exactly the pods the preview named
    assert re.search(
        r"^\s+gpu-a100\s+A100-SXM4-40GB x8\s+all-balanced\s+success\s+\S+\s+-\s+all-balanced applied",
        out,
        re.M,
    ), out
    assert re.search(
        r"^\s+\* all-balanced\s+yes\s+GPUs 0-7: 2g.10gb@0, 1g.5gb@2, 1g.5gb@3, 3g.20gb@4$", out, re.M
    )
    assert "10 of 84 configs in ConfigMap gpu-operator/default-mig-parted-config fit node gpu-a100" in out
    assert (
        "node gpu-a100: all-balanced -> all-1g.5gb (ConfigMap gpu-operator/default-mig-parted-config)" in out
    )
    preview = [
        "impact of all-1g.5gb: 8 of 8 GPUs change, 2 pods to evict",
        "GPU 0: 2g.10gb, 3g.20gb -> 1g.5gb x5, evicts ml/train-0",
        "GPUs 1-2,4-7: 2g.10gb, 3g.20gb -> 1g.5gb x5, evicts no pods",
        "GPU 3: 2g.10gb, 3g.20gb -> 1g.5gb x5, evicts ml/infer-1",
    ]
    for line in preview:
        assert f"           {line}\n" in out  # kubectl mig plan
        assert f"Warning: {line}\n" in out  # the webhook, on the dry run and on the change
    assert "node/gpu-a100 labeled (server dry run)\n           Warning: impact of all-1g.5gb" in out
    assert "evicted: ml/infer-1, ml/train-0\n           kept running: ml/infer-0, ml/notebook" in out
    assert "the change evicted exactly the pods the preview named" in out
    assert "waiting for:  nothing: the GPUs hold all-1g.5gb" in out
    assert "export KUBECONFIG=" in out
    assert "Stopping everything" in out
