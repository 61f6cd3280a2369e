"""The exponential graph's partners: symmetric on a hypercube, exact average after log2 n rounds of
pairwise averaging (n a power of 2), a contraction otherwise, and sane with small or odd views."""

from __future__ import annotations

import pytest
import torch

from p2pnode.config import GossipConfig
from p2pnode.errors import ConfigError
from p2pnode.peer_selection import exponential_partners

IDS = [f"peer-{i:02d}" for i in range(16)]


def _gossip_rounds(n: int, rounds: int, k: int) -> torch.Tensor:
    """Lock-step push-pull rounds on the exponential graph: each node ends a round with the mean of its
    own value, its partners' and those who chose it (each counted once). Returns the final values."""
    ids = IDS[:n]
    x = torch.arange(n, dtype=torch.float64) ** 2
    for r in range(rounds):
        inputs = [{i} for i in range(n)]
        for i, me in enumerate(ids):
            for p in exponential_partners(me, [o for o in ids if o != me], r, k):
                j = ids.index(p)
                inputs[i].add(j)  # pulled
                inputs[j].add(i)  # pushed to j
        x = torch.stack([x[sorted(s)].mean() for s in inputs])
    return x


@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_one_peer_hypercube_gives_the_exact_average_after_log2_n_rounds(n: int) -> None:
    tau = (n - 1).bit_length()
    mean = (torch.arange(n, dtype=torch.float64) ** 2).mean().expand(n)
    assert torch.allclose(_gossip_rounds(n, tau, 1), mean)
    if n > 2:
        assert not torch.allclose(_gossip_rounds(n, tau - 1, 1), mean)


def test_on_a_hypercube_the_partner_relation_is_symmetric() -> None:
    for r in range(6):
        for me in IDS[:8]:
            (p,) = exponential_partners(me, IDS[:8], r, 1)
            assert exponential_partners(p, IDS[:8], r, 1) == [me]


@pytest.mark.parametrize("n", [3, 5, 6, 7, 12])
def test_other_sizes_contract_the_spread_each_cycle(n: int) -> None:
    tau = (n - 1).bit_length()
    start = torch.arange(n, dtype=torch.float64) ** 2
    end = _gossip_rounds(n, 3 * tau, 1)
    assert end.std() < 0.05 * start.std()
    assert end.mean() == pytest.approx(start.mean(), rel=0.5)  # a mix, not a drift to one end


def test_fanout_gives_distinct_partners_and_never_itself() -> None:
    for n in (2, 3, 8, 9):
        ids = IDS[:n]
        for k in (1, 2, 3, 10):
            for r in range(5):
                got = exponential_partners(ids[0], ids[1:], r, k)
                assert len(got) == len(set(got)) <= min(k, n - 1)
                assert ids[0] not in got
                assert set(got) <= set(ids[1:])
    assert exponential_partners("a", [], 0, 2) == []
    assert exponential_partners("a", ["b"], 3, 0) == []
    assert exponential_partners("a", ["a", "b"], 0, 1) == ["b"]  # its own id in the view is ignored


def test_config_checks_the_name_and_refuses_it_with_bristle() -> None:
    GossipConfig(peer_selection="exponential")
    with pytest.raises(ConfigError, match="peer_selection"):
        GossipConfig(peer_selection="ring")
    with pytest.raises(ConfigError, match="Bristle"):
        GossipConfig(peer_selection="exponential", defense="bristle")
