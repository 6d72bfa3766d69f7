"""A Spark partition's spill file: bounded memory, whatever the partition's size.

The file is written by the Spark engine's own `_spill`, and read back by `SpillSource` in a
fresh process, as a worker does, so the memory measured is the reader's alone.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa

from corral.data.spill import ROWS_FROM_ENV, SPILL_ENV
from corral.engines.spark import _spill

ROWS, WIDTH = 80_000, 32  # 32 doubles and a label per row: a 20 MiB partition

READ_ONE_EPOCH = """
import json, sys
from pathlib import Path
from corral.data.spill import SpillSource

def anonymous_kib():
    status = Path("/proc/self/status").read_text()
    return int(next(l for l in status.splitlines() if l.startswith("RssAnon:")).split()[1])

# Arrow's first conversion reserves about 30 MiB once, whatever the data: not the reader's
import pyarrow as pa
from corral.data.arrow import feature_matrix
feature_matrix(pa.table({"a": [1.0]}), ["a"])

source = SpillSource([f"f{i}" for i in range(int(sys.argv[1]))], "y")
source.steps_per_epoch(1, 1024)  # opens the file
first = peak = anonymous_kib()
rows = 0
for x, y in source.batches(rank=0, world_size=1, epoch=0, seed=0, batch_size=1024, shuffle=True):
    rows += len(y)
    peak = max(peak, anonymous_kib())
print(json.dumps({"grew_mib": (peak - first) / 1024, "rows": rows}))
"""


def read_one_epoch(tmp_path, buffer_mb: float) -> dict:
    rng = np.random.default_rng(0)
    columns = {f"f{i}": rng.random(ROWS) for i in range(WIDTH)}
    table = pa.table({**columns, "y": rng.integers(0, 2, ROWS)})
    path = str(tmp_path / "partition.arrow")
    # one incoming batch as large as the partition: the buffer alone must bound the blocks
    rows = _spill(table.to_batches(max_chunksize=ROWS), table.schema, path, int(buffer_mb * 2**20))
    counts = tmp_path / "rows"  # the engine's FIFO; a plain file reads the same
    counts.write_text(str(rows))
    env = {SPILL_ENV: path, ROWS_FROM_ENV: str(counts), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", READ_ONE_EPOCH, str(WIDTH)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(out.stdout)


def test_a_worker_holds_one_buffer_of_a_partition_20_times_larger(tmp_path):
    read = read_one_epoch(tmp_path, buffer_mb=1)
    assert read["rows"] == ROWS
    # measured: 5 MiB (a 1 MiB block, its float32 copy, a batch, the epoch's row order);
    # under half the partition, where holding it would take over 30 MiB (the control below)
    assert read["grew_mib"] < 10


def test_the_measure_sees_a_whole_partition_held_at_once(tmp_path):
    """The negative control: with a buffer larger than the partition, one block holds it
    all, and the same measure sees it."""
    read = read_one_epoch(tmp_path, buffer_mb=64)
    assert read["grew_mib"] > 20
