"""`python -m trainctl.torchrun LAUNCHER_PID TORCHRUN_ARGS...`: torchrun, tied to the `trainctl run`
that started it.

When trainctl starts the processes of a job itself (`parallelism.nproc_per_node=N`), it runs torchrun
through this module. If the launching `trainctl run` dies - killed with SIGKILL, or its terminal gone -
torchrun gets SIGTERM and passes it to the ranks, which stop at the next step they agree on, save a
checkpoint and exit, so no process keeps training unsupervised and the run directory is left resumable.
The ranks in turn follow torchrun (see :func:`trainctl.parallel.follow_launcher`).
"""

from __future__ import annotations

import os
import sys

from trainctl.launch import AGENT_PID, die_with_parent


def main() -> None:
    launcher, args = int(sys.argv[1]), sys.argv[2:]
    die_with_parent(launcher)
    os.environ[AGENT_PID] = str(os.getpid())  # the ranks' expected parent
    from torch.distributed.run import main as torchrun

    torchrun(args)


if __name__ == "__main__":
    main()
