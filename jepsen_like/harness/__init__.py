"""The fault-injection harness: real kvsvr nodes, link proxies, nemeses, workloads.

    async with open_cluster(directory, node_count=3) as cluster:
        rng = random.Random(seed)
        workload = RegisterWorkload(key_count=4, rng=rng)
        nemeses = [make_nemesis(name, cluster, rng) for name in ("kill", "partition")]
        outcome = await drive(cluster, workload, nemeses, Timing(30.0), History())
    result = check_history(outcome.history, workload)   # result.verdict

or, all of it as the command line does: `run(RunConfig(out_dir, ...))`.
See jepsen_like/README.md.
"""

from jepsen_like.harness.client import NodeClient, NotSent
from jepsen_like.harness.cluster import (
    Cluster,
    ClusterError,
    NodeEvent,
    open_cluster,
)
from jepsen_like.harness.corrupt import Corruption, corrupt_file, find_rows
from jepsen_like.harness.history import History, checker_ops, read_history
from jepsen_like.harness.nemesis import (
    NEMESES,
    CorruptNemesis,
    DelayNemesis,
    FaultWindow,
    FlakyNemesis,
    KillNemesis,
    Nemesis,
    NemesisError,
    PartitionNemesis,
    PauseNemesis,
    ResetNemesis,
    Schedule,
    apply_fault,
    heal_everything,
    make_nemesis,
    run_schedule,
)
from jepsen_like.harness.partitions import (
    SHAPES,
    Cut,
    Link,
    all_links,
    bridge,
    cut_between,
    describe_cut,
    isolate,
    majorities_ring,
    majority,
    majority_minority,
    reachable,
    shape_cut,
)
from jepsen_like.harness.proxy import PASS, LinkMode, LinkProxy, LinkStats, Network
from jepsen_like.harness.run import (
    EXIT_ANOMALY,
    EXIT_INVALID,
    EXIT_LINEARIZABLE,
    EXIT_UNKNOWN,
    DriveOutcome,
    RunConfig,
    RunInterrupted,
    RunResult,
    Timing,
    check_history,
    count_by_phase,
    drive,
    run,
    run_test,
)
from jepsen_like.harness.workload import (
    WORKLOADS,
    KvWorkload,
    RegisterWorkload,
    Workload,
    make_workload,
)

__all__ = [
    "EXIT_ANOMALY",
    "EXIT_INVALID",
    "EXIT_LINEARIZABLE",
    "EXIT_UNKNOWN",
    "NEMESES",
    "PASS",
    "SHAPES",
    "WORKLOADS",
    "Cluster",
    "ClusterError",
    "CorruptNemesis",
    "Corruption",
    "Cut",
    "DelayNemesis",
    "DriveOutcome",
    "FaultWindow",
    "FlakyNemesis",
    "History",
    "KillNemesis",
    "KvWorkload",
    "Link",
    "LinkMode",
    "LinkProxy",
    "LinkStats",
    "Nemesis",
    "NemesisError",
    "Network",
    "NodeClient",
    "NodeEvent",
    "NotSent",
    "PartitionNemesis",
    "PauseNemesis",
    "RegisterWorkload",
    "ResetNemesis",
    "RunConfig",
    "RunInterrupted",
    "RunResult",
    "Schedule",
    "Timing",
    "Workload",
    "all_links",
    "apply_fault",
    "bridge",
    "check_history",
    "checker_ops",
    "corrupt_file",
    "count_by_phase",
    "cut_between",
    "describe_cut",
    "drive",
    "find_rows",
    "heal_everything",
    "isolate",
    "majorities_ring",
    "majority",
    "majority_minority",
    "make_nemesis",
    "make_workload",
    "open_cluster",
    "reachable",
    "read_history",
    "run",
    "run_schedule",
    "run_test",
    "shape_cut",
]
