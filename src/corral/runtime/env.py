"""The environment of a job's process: every variable corral sets, named once.

The launcher writes them (`process_env`), an engine may rewrite the serving address
(`HOST`) for the machine it runs a process on, and `Context.from_env` reads them once at
the start of the process. Nothing else in corral reads them. The torch.distributed names
(``MASTER_ADDR``, ``RANK``, ``LOCAL_RANK``…) are set too, so code written for torchrun
runs unchanged.
"""

from __future__ import annotations

#: The address this process serves on (a parameter server's shard, a gossip mailbox): the
#: caller's for local processes; an engine running it elsewhere sets its machine's.
HOST = "CORRAL_HOST"
#: ``host:port`` of the driver's control channel, and its key (hex).
CONTROL = "CORRAL_CONTROL"
CONTROL_KEY = "CORRAL_CONTROL_KEY"
#: The process's role in the plan (``worker``, ``server``…).
ROLE = "CORRAL_ROLE"
#: Where the job's checkpoints are, and how many of them to keep.
CHECKPOINT_DIR = "CORRAL_CHECKPOINT_DIR"
KEEP_CHECKPOINTS = "CORRAL_KEEP_CHECKPOINTS"
#: ``1`` for a worker started into a running job in place of a lost one.
JOINING = "CORRAL_JOINING"
#: ``1`` for a helper restarted in place, which restores its own state.
RESTORE = "CORRAL_RESTORE"
#: ``1`` when the job trains on without lost workers: any survivor may return the result.
ELASTIC = "CORRAL_ELASTIC"
#: The index, among the GPUs this process sees, of its first own GPU: engines show a
#: process all of its role's GPUs on the host, as torchrun does, so that ``cuda:LOCAL_RANK``
#: is its own; this says which is its own when it has several.
DEVICE = "CORRAL_DEVICE"
#: How many times the whole group was started again (torchrun's name).
RESTART_COUNT = "TORCHELASTIC_RESTART_COUNT"
