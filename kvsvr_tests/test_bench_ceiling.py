"""The no-fsync ceilings of `bench.single_node` and `bench.cluster`: a run is
refused when a node's status contradicts the fsync setting it was meant to
have, and the ceiling ratio is the no-fsync rate over the raw rate. No
cluster is started."""

from __future__ import annotations

import math

import pytest

from bench import cluster, single_node
from bench.phases import check_fsync_setting


def _run(*fsyncs: object) -> dict[str, object]:
    return {"final_status": {f"n{i}": {"fsync": f} for i, f in enumerate(fsyncs, 1)}}


def test_a_run_whose_nodes_fsync_as_meant_passes() -> None:
    check_fsync_setting(_run(True, True, True), fsync=True)
    check_fsync_setting(_run(False), fsync=False)


@pytest.mark.parametrize(
    ("statuses", "meant"),
    [((True, False, True), True), ((False, True), False), ((None,), True), ((None,), False)],
)
def test_a_run_whose_nodes_contradict_the_setting_is_refused(
    statuses: tuple[object, ...], meant: bool
) -> None:
    with pytest.raises(SystemExit, match=f"needs fsync={meant}"):
        check_fsync_setting(_run(*statuses), fsync=meant)


def test_the_ceiling_ratio_is_the_no_fsync_rate_over_the_raw_rate() -> None:
    ceiling = {"phases": {"put": {"ops_per_s": 6000.0}}}
    assert single_node.ceiling_ratio(ceiling, {"ops_per_s": 2000.0}) == 3.0
    assert math.isnan(single_node.ceiling_ratio(ceiling, {"ops_per_s": 0}) or 0.0)
    assert single_node.ceiling_ratio(None, {"ops_per_s": 2000.0}) is None


def test_the_benchmarks_take_their_ceiling_options() -> None:
    args = single_node.build_parser().parse_args(["--no-ceiling"])
    assert args.no_ceiling is True
    assert single_node.build_parser().parse_args([]).no_ceiling is False
    args = cluster.build_parser().parse_args(["--unsafe-no-fsync", "--paced-rate", "1700"])
    assert args.unsafe_no_fsync is True and args.paced_rate == 1700.0
    with pytest.raises(SystemExit):
        cluster.main(["--paced-rate", "0"])
