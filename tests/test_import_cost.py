"""Reading a job spec loads no torch, NumPy or ZeroMQ, so a bad spec fails in a moment.

Each check runs in a fresh interpreter: in this one, other tests have long imported torch.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

#: What a spec's error must not wait for (torch alone is about 1.5 s of CPU).
HEAVY = ("torch", "numpy", "zmq")

#: Every strategy kind, so each strategy module's config is built and validated.
CHECK = textwrap.dedent("""
    import sys

    from corral.spec import JobSpec, parse

    for strategy in ({"kind": "allreduce", "compression": "powersgd"},
                     {"kind": "averaging", "every": 4}, {"kind": "gossip"},
                     {"kind": "ps", "mode": "ssp", "staleness": 2, "servers": 2},
                     {"kind": "fedadam", "clients": 10, "partition": {"kind": "shards"},
                      "secure": {"bits": 24}, "privacy": {"clip": 1, "noise_multiplier": 1}},
                     {"kind": "fedbuff", "clients": 10, "buffer": 2, "concurrency": 4}):
        parse(JobSpec, {"entrypoint": "m:f", "data": {"path": "d", "label": "y"},
                        "loss": "mse", "strategy": strategy})
    print(" ".join(m for m in sys.modules if m.partition(".")[0] in sys.argv[1:]))
""")


def test_reading_a_spec_imports_nothing_heavy():
    out = subprocess.run(
        [sys.executable, "-c", CHECK, *HEAVY], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == []


def test_a_named_loss_is_still_its_torch_module():
    import torch

    from corral.spec import LOSSES

    assert isinstance(LOSSES["cross_entropy"](), torch.nn.CrossEntropyLoss)
    assert LOSSES["mse"](reduction="sum").reduction == "sum"
