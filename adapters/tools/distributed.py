"""The simulated workload across real processes: tensor-parallel ranks over gloo, the Encode side over Mooncake.

Every rank runs the unchanged controller over its own pool, registered with its own transfer engine, and
receives a full copy of every payload from the Encode process, over the SGLang fork's wire: the ranks find
the Encode process through a bootstrap server this driver runs, and the Encode process learns which rooms
exist (T, seed, injected faults) over its control socket, as a real one learns them from its scheduler.
The workload is a plan every rank derives from the same seed, so the ranks admit the same rooms in the
same iterations; the rest of their lockstep is the controller's (reduced polls and deadlines, agreed
totals, compared allocator fingerprints). Every rank verifies every payload bit for bit against the
source it regenerates from (seed, room, T), and the summary says what happened on each, with the frames
each side dropped.
"""

from __future__ import annotations

import random
import time
from typing import Any

from epd_receiver.adapters.kit.world_config import WorldConfig
from epd_receiver.adapters.ports.mooncake.bootstrap import BootstrapServer
from epd_receiver.adapters.ports.mooncake.desk import FAIL_ON_RESUME, RoomPlan
from epd_receiver.adapters.ports.mooncake.link import Geometry
from epd_receiver.adapters.ports.ranks import RankProcesses
from epd_receiver.adapters.tools.distributed_summary import summarize
from epd_receiver.adapters.tools.encode.control import EncodeProcess
from epd_receiver.adapters.tools.rank_job import Arrival, RankRun, run_rank
from epd_receiver.adapters.tools.simulate import Workload, draw_length

# The rank's job (rank_job.py) and the summary (distributed_summary.py) are still importable from here.


def plan(config: WorldConfig, workload: Workload) -> list[Arrival]:
    """The workload's requests, drawn from its seed alone, so that every process derives the same plan."""
    rng = random.Random(workload.seed)
    arrivals = []
    for room in range(workload.requests):
        total = draw_length(rng, config, workload)
        progress = rng.random() < workload.progress_share
        fault = FAIL_ON_RESUME if rng.random() < workload.fail_rate else None
        arrivals.append(Arrival(room, total, progress, fault, abort=rng.random() < workload.abort_rate))
    return arrivals


# ---- the driver -------------------------------------------------------------------------------------


class Cluster:
    """The Encode process and the rank processes, started once and reused for one workload after another."""

    def __init__(self, ranks: int) -> None:
        self.bootstrap = BootstrapServer()
        try:
            self.encode = EncodeProcess(self.bootstrap.address)
            self.ranks = RankProcesses(ranks)
        except BaseException:
            self.close()
            raise

    def ensure_encode(self) -> EncodeProcess:
        """A fresh Encode process when the last one died (a fault test kills it); it registers anew."""
        if not self.encode.alive:
            self.encode.kill()
            self.encode = EncodeProcess(self.bootstrap.address, self.encode.endpoint)
        return self.encode

    def run(
        self,
        config: WorldConfig,
        workload: Workload,
        arrivals: list[Arrival] | None = None,
        *,
        checksum: bool = False,
        settle_s: float = 5.0,
        bench: bool = True,
    ) -> dict[str, Any]:
        arrivals = plan(config, workload) if arrivals is None else arrivals
        encode = self.ensure_encode()
        geometry = Geometry(config.num_blocks, config.block_size, config.hidden_size, config.deepstack)
        plans = [RoomPlan(a.room, a.total_tokens, workload.seed, checksum, a.fault) for a in arrivals]
        encode.control.begin(geometry, plans)
        job = RankRun(
            self.bootstrap.address,
            encode.endpoint,
            config,
            tuple(arrivals),
            workload.seed,
            workload.arrivals_per_step,
            checksum,
            settle_s=settle_s,
            bench=bench,
        )
        started = time.perf_counter()
        results = self.ranks.run(run_rank, job, timeout_s=job.wall_limit_s + 120)
        return summarize(config, arrivals, results, time.perf_counter() - started)

    def close(self) -> None:
        if hasattr(self, "ranks"):
            self.ranks.close()
        if hasattr(self, "encode"):
            self.encode.stop()
        self.bootstrap.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def simulate_distributed(
    config: WorldConfig, workload: Workload, ranks: int, *, checksum: bool = False
) -> dict[str, Any]:
    """``epd-receiver simulate --transport mooncake``: start the processes, run the workload, stop them."""
    with Cluster(ranks) as cluster:
        return cluster.run(config, workload, checksum=checksum)
