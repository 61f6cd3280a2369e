"""Network faults on real multi-process swarms, each node in its own network namespace on a private
bridge (:mod:`p2pnode.bench.netns`): a 4+4 partition and its heal, 20% packet loss on every node, and a
1 Mbit/s link on one node. Needs root and ip/iptables/tc (skipped otherwise, with the reason); all
traffic stays inside the lab's namespaces (10.213.7.0/24, no route out).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from p2pnode.bench.netns import NetnsLab, NetnsSwarm, unavailable_reason
from p2pnode.bench.partition import PartitionOptions, run_partition_bench
from p2pnode.swarm import Swarm, SwarmOptions
from p2pnode.tasks.fashion_mnist import DEFAULT_DATA_DIR

pytestmark = [pytest.mark.integration]

HEARTBEAT_S = 2.0  # the node default (--heartbeat-s)
# A round waits for every sampled peer up to --timeout-exchange (30 s by default); 4 s is far above what a
# digits or fashion-mnist exchange takes here, and keeps a cut-off peer from holding a round for 30 s.
NET_FLAGS = ["--timeout-exchange", "4", "--timeout-connect", "2", "--wait-peers-s", "120"]


@pytest.fixture
def lab_nodes() -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


def _round_times(swarm: Swarm, node: int) -> list[float]:
    return [ev["t"] for ev in swarm.events() if ev["node"] == node and ev["event"] == "round"]


@pytest.mark.timeout(300)
@pytest.mark.skipif(not DEFAULT_DATA_DIR.is_dir(), reason="dataset-fashion-mnist is not installed")
@pytest.mark.usefixtures("lab_nodes")
def test_a_partition_4_plus_4_keeps_both_halves_training_and_heals_within_10_rounds(tmp_path: Path) -> None:
    # fashion-mnist, not digits: a digits round takes ~0.1 s, shorter than one membership heartbeat (2 s),
    # so "10 rounds after the heal" would be ~1 s, less than the records need to cross; it also keeps the
    # nodes' rounds close (each node's round r is compared with the others' round r). 12 rounds of cut
    # (median), at least 16 s and at most 30 s: the views shrink once the other half's records expire (8 s
    # TTL plus heartbeats), and a CI run starved by another job healed after 12.7 s, before any view had
    # shrunk. `p2pnode bench partition` runs the 20-round (~90 s) cut. 84 rounds in all: a node cut off from
    # slow peers can run well ahead of the median, and it must not finish its rounds before it has seen the
    # heal (42-43 rounds in an 18 s cut on a quiet machine; 37 in a 17.8 s cut when a starved node lost even
    # its own half from view and trained alone).
    opts = PartitionOptions(nodes=8, rounds=84, cut_at=8, heal_at=20, min_cut_s=16.0, max_cut_s=30.0,
                            window=4, task="fashion-mnist", local_steps=10,
                            node_args=(*NET_FLAGS, "--eval-samples", "500"), out_dir=tmp_path / "run",
                            json_path=tmp_path / "partition.json", plot_path=None)

    res = run_partition_bench(opts)

    facts = json.dumps({k: v for k, v in res.items() if k not in ("curve", "accuracy", "options")})
    assert res["all_finished"], facts
    # the cut took: no node saw the other half any more, and the halves drifted apart
    assert all(v <= 3 for v in res["view_before_heal"]), facts
    assert res["peak_across_while_cut"] > 1.5 * res["pre_partition_level"], facts
    # both halves kept training while cut off, and their accuracy did not collapse
    assert min(res["rounds_made_while_cut"]) >= 3, facts
    at_cut = next(r for r in res["accuracy"] if r["round"] == res["cut"]["median"])
    for half in ("a", "b"):
        assert res["min_accuracy_while_cut"][half] >= at_cut[half] - 0.05, facts
    # healed: every view is whole again, and within 10 rounds the halves are mixed (across-halves distance
    # no larger than within) and the all-pairs distance is back within its pre-partition range
    assert all(v == 7 for v in res["largest_view_after_heal"]), facts
    assert res["rounds_to_mix"] is not None, facts
    assert res["rounds_to_mix"] <= 10, facts
    assert res["rounds_to_recover"] is not None, facts
    assert res["rounds_to_recover"] <= 10, facts


@pytest.mark.timeout(240)
@pytest.mark.usefixtures("lab_nodes")
def test_the_swarm_learns_with_20_percent_packet_loss_on_every_node(tmp_path: Path) -> None:
    nodes, rounds = 4, 12
    opts = SwarmOptions(nodes=nodes, rounds=rounds, task="digits", out=tmp_path / "run", linger_s=10.0,
                        extra_args=["--wait-peers-s", "120"])
    with NetnsLab(nodes) as lab, NetnsSwarm(opts, lab) as swarm:
        # loss from the start: installed after start(), the rules came too late under load (a digits round
        # takes ~0.1 s; in one loaded run the 4 nodes' 12 rounds were over before the 8 iptables calls,
        # and the rules counted 25 packets)
        lab.loss(range(nodes), 0.2)
        swarm.start()
        finished = swarm.wait_finished(timeout=180)
        counts = [lab.loss_counts(i) for i in range(nodes)]
        progress = swarm.poll_progress()

    assert finished, progress
    for (arrived, dropped), p in zip(counts, progress):
        # the fault was real: about one packet in five that reached the node was dropped
        assert arrived >= 300, counts
        assert 0.15 <= dropped / arrived <= 0.25, counts
        assert p.round == rounds, p
        # a clean run of this swarm ends at 0.93-0.97 (min over nodes; tests/integration asks >= 0.85)
        assert p.test_accuracy is not None, p
        assert p.test_accuracy >= 0.8, p


@pytest.mark.timeout(240)
@pytest.mark.usefixtures("lab_nodes")
def test_a_node_on_a_1_mbit_link_keeps_making_rounds_without_holding_up_the_others(tmp_path: Path) -> None:
    nodes, rounds, slow, rate_bps = 4, 20, 3, 1_000_000
    opts = SwarmOptions(nodes=nodes, rounds=rounds, task="digits", out=tmp_path / "run", linger_s=20.0,
                        extra_args=NET_FLAGS)
    with NetnsLab(nodes) as lab, NetnsSwarm(opts, lab) as swarm:
        # capped from the start: set after start(), the cap came too late in one CI run (the slow node's
        # 20 digits rounds were over within 0.46 s of each other, at 20 Mbit/s, before the two tc calls)
        lab.cap(slow, "1mbit")
        swarm.start()
        finished = swarm.wait_finished(timeout=180)
        progress = swarm.poll_progress()
        times = [_round_times(swarm, i) for i in range(nodes)]

    assert finished, progress
    assert all(p.round == rounds for p in progress), progress
    # the cap was real and the link was the slow node's bottleneck: what it sent (payload only) over its
    # rounds fits in the link, and filled a good part of it
    span = times[slow][-1] - times[slow][0]
    rate = progress[slow].bytes_sent * 8 / span
    assert 0.4 * rate_bps <= rate <= rate_bps, (rate, progress[slow], span)
    # the others were never held up by it: no round of theirs waited more than a few heartbeats
    for i in range(nodes):
        gaps = [b - a for a, b in zip(times[i], times[i][1:])]
        assert max(gaps) <= 3 * HEARTBEAT_S, (i, gaps)
