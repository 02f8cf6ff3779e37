"""The test layers, and which test belongs to which.

- `unit`: pure code in this process: the protocol core driven by hand, the
  codec, storage on a temporary LMDB, checkers on fixed histories, the
  benchmarks' arithmetic, property tests under hypothesis. No node process,
  no TCP, no long search: the layer to run after every change.
- `simulation`: the deterministic simulator and the linearizability
  checker's searches (many seeds, generated histories, the shared corpus),
  and the long property searches (fast parsers against their checks),
  still in this process or its worker pool.
- `process`: starts node processes or other programs, or opens TCP
  connections (real nodes, fake nodes on real sockets, proxies).

A test file's layer is in `FILE_LAYERS`. A test whose layer differs from its
file's is named in `TEST_LAYERS`, and a test marked `slow` (it starts real
node processes) is in `process` wherever it is. `conftest.py` applies them
as markers; `test_layers.py` checks that the tables name every test file and
only tests that exist.
"""

from __future__ import annotations

from typing import Final

UNIT: Final = "unit"
SIMULATION: Final = "simulation"
PROCESS: Final = "process"
LAYERS: Final = (UNIT, SIMULATION, PROCESS)

FILE_LAYERS: Final[dict[str, str]] = {
    "test_api_messages.py": UNIT,
    "test_apps_chat.py": PROCESS,
    "test_apps_moments.py": PROCESS,
    "test_bench_cache.py": UNIT,
    "test_bench_ceiling.py": UNIT,
    "test_bench_compare.py": UNIT,
    "test_bench_etcd_go.py": UNIT,
    "test_bench_load.py": UNIT,
    "test_bench_wakeup.py": PROCESS,
    "test_backup_cluster.py": PROCESS,
    "test_backup_units.py": UNIT,
    "test_bench_watch.py": PROCESS,
    "test_build.py": UNIT,
    "test_cache.py": UNIT,
    "test_cache_memory.py": PROCESS,
    "test_catch_up.py": PROCESS,
    "test_catchup_node.py": UNIT,
    "test_catchup_protocol.py": UNIT,
    "test_clock.py": UNIT,
    "test_checker_cli.py": PROCESS,
    "test_checker_conflict.py": UNIT,
    "test_checker_corpus.py": SIMULATION,
    "test_checker_formats.py": UNIT,
    "test_checker_perf.py": SIMULATION,
    "test_checker_props.py": SIMULATION,
    "test_checker_report.py": UNIT,
    "test_checker_search.py": SIMULATION,
    "test_checker_stale.py": UNIT,
    "test_checker_watch.py": UNIT,
    "test_cli.py": PROCESS,
    "test_client.py": PROCESS,
    "test_client_fakes.py": PROCESS,
    "test_config.py": UNIT,
    "test_tls.py": PROCESS,
    "test_netns.py": PROCESS,
    "test_listen_advertise.py": PROCESS,
    "test_gc_cycles.py": PROCESS,
    "test_harness.py": PROCESS,
    "test_harness_stale.py": UNIT,
    "test_import_cycles.py": UNIT,
    "test_integration_cas.py": PROCESS,
    "test_integration_cluster.py": PROCESS,
    "test_integration_durability.py": PROCESS,
    "test_integration_lifecycle.py": PROCESS,
    "test_integration_linearizable.py": PROCESS,
    "test_layers.py": UNIT,
    "test_leases.py": UNIT,
    "test_lifecycle.py": UNIT,
    "test_logs.py": PROCESS,
    "test_metrics.py": PROCESS,
    "test_module_sizes.py": UNIT,
    "test_node_entry_points.py": PROCESS,
    "test_near_cache.py": PROCESS,
    "test_net.py": UNIT,
    "test_node_identity.py": PROCESS,
    "test_read_lease.py": UNIT,
    "test_read_leases_process.py": PROCESS,
    "test_protocol.py": UNIT,
    "test_repair.py": PROCESS,
    "test_replication_units.py": UNIT,
    "test_residency.py": UNIT,
    "test_round_timer.py": UNIT,
    "test_rpc.py": PROCESS,
    "test_sim.py": SIMULATION,
    "test_storage.py": UNIT,
    "test_task_free_drive.py": UNIT,
    "test_top.py": PROCESS,
    "test_watch_cluster.py": PROCESS,
    "test_watch_harness.py": PROCESS,
    "test_watch_hub.py": UNIT,
    "test_watch_log.py": UNIT,
    "test_write_batching.py": UNIT,
}

# "file::test function" -> layer, for tests not in their file's layer.
TEST_LAYERS: Final[dict[str, str]] = {
    # Run the Go load generator's binary (or a stand-in) as a process.
    "test_bench_etcd_go.py::test_a_failed_build_is_unavailable_not_fatal": PROCESS,
    "test_bench_etcd_go.py::test_a_failing_driver_fails_the_phase_with_its_message": PROCESS,
    "test_bench_etcd_go.py::test_run_phase_drives_a_go_target_through_its_binary": PROCESS,
    # Serves a node in this process on a real socket.
    "test_cache.py::test_a_cache_hit_skips_the_coordinators_own_version_read": PROCESS,
    # Hypothesis-chosen fault schedules run through the simulator.
    "test_protocol.py::test_fault_schedules_stay_linearizable": SIMULATION,
    # Long hypothesis searches: a fast parser against its field-by-field
    # checks over thousands of inputs (most of the unit layer's time).
    "test_net.py::test_fast_envelope_parse_agrees_with_the_checks": SIMULATION,
    "test_net.py::test_decoder_yields_frames_or_frame_error_only": SIMULATION,
    "test_storage.py::test_codec_fast_decode_agrees_with_the_field_by_field_checks": SIMULATION,
    "test_protocol.py::test_fast_parse_agrees_with_the_field_by_field_checks": SIMULATION,
}


def layer_of(file_name: str, test_name: str, *, starts_nodes: bool) -> str | None:
    """The layer of test function `test_name` (without parameters) in
    `file_name`; None for a file the table does not name."""
    if starts_nodes:
        return PROCESS
    return TEST_LAYERS.get(f"{file_name}::{test_name}", FILE_LAYERS.get(file_name))
