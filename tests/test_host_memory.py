"""reuse_freed_memory: a training step's freed tensors are reused, not faulted in afresh."""

import subprocess
import sys
import textwrap

import pytest

# A field's forward and backward on 20,000 points (tensors of ~10 MB), in a fresh process.
SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from fieldkern.host_memory import reuse_freed_memory
    from fieldkern.nn import ResidualMFN

    applied = reuse_freed_memory() if sys.argv[1] == "reuse" else None
    torch.set_num_threads(1)  # one malloc arena: the count does not depend on thread scheduling
    torch.manual_seed(0)
    model = ResidualMFN(3, 128, 1, 3, 32, head_activation="relu")
    x = torch.rand(20000, 3) - 0.5
    for _ in range(10):  # the heap's steady state
        model(x)[-1].sum().backward()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        model(x)[-1].sum().backward()
    print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
""")


def faults_per_step(mode):
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, float(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_tensors_are_reused_without_page_faults():
    _, default = faults_per_step("default")
    applied, reused = faults_per_step("reuse")
    assert applied == "True"
    # Measured on the 2-core development VM: 5500-9000 page faults a step with glibc's
    # defaults (fresh pages for tensors that were just freed), 0-250 with freed memory kept.
    assert reused < 0.2 * default
