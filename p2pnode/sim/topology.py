"""Overlay topologies for the simulator, and the membership view that offers only a node's live neighbours.

A topology is an undirected graph on the nodes ``0..n-1``, returned as sorted adjacency lists
(``adj[i]`` is the list of i's neighbours; ``j in adj[i]`` iff ``i in adj[j]``; no self-loops). Every
generator is deterministic: the same ``(n, parameters, seed)`` gives the same graph on every host.

Specs (``p2pnode simulate --topology``), parsed by :func:`parse_topology`:

- ``full`` (alias ``complete``): everyone is everyone's neighbour, as in a real swarm whose DHT view
  holds every member. :meth:`Topology.build` returns ``None`` for it (no n² lists are built);
  :class:`NeighbourView` then samples from all live nodes.
- ``random-k:K``: a random K-regular graph (:func:`random_k`): every node has exactly K neighbours
  (when ``n*K`` is odd, node 0 gets K+1). For K >= 3 it is connected (a disconnected draw is redrawn).
- ``ba:M``: Barabási–Albert preferential attachment (:func:`barabasi_albert`): each new node links to M
  existing nodes chosen with probability proportional to their degree; connected, heavy-tailed degrees.
- ``geometric:R`` or ``geometric:R:D``: random geometric graph (:func:`random_geometric`): n points
  uniform in the unit square, an edge between points at distance <= R; with D, at most D neighbours per
  node (shortest edges first). Not necessarily connected (see :func:`components`).

API (stable; the scenario code imports it)::

    topo = parse_topology("geometric:0.08:7")       # -> Topology(kind="geometric", param=0.08, max_degree=7)
    adj = topo.build(1000, seed)                      # list[list[int]], or None for "full"
    adj = barabasi_albert(n, m, seed); adj = random_geometric(n, radius, seed, max_degree=7)
    adj = random_k(n, k, seed); adj = complete(n)
    degrees(adj), is_connected(adj), components(adj), edge_count(adj)

    directory = PeerDirectory(records)                # records[i]: node i's MembershipRecord
    view = NeighbourView(i, adj[i] or None, directory, random.Random(...))   # a PeerView for Node
    directory.set_alive(j, False)                     # churn: j left (no view offers it)...
    directory.set_alive(j, True)                      # ... and came back (offered again)

``seed`` may be an int or a :class:`numpy.random.Generator`.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import cast, overload

import numpy as np

from protocols.records import MembershipRecord

Adjacency = list[list[int]]
SeedLike = int | np.random.Generator

TOPOLOGY_ALLOWED = "full | random-k:K | ba:M | geometric:R | geometric:R:MAX_DEGREE"
KINDS = ("full", "random-k", "ba", "geometric")


# ---------------------------------------------------------------------------------------------- specs
@dataclass(frozen=True, slots=True)
class Topology:
    """A parsed ``--topology`` spec; :meth:`build` draws the graph.

    Attributes
    ----------
    kind
        ``"full"``, ``"random-k"``, ``"ba"`` or ``"geometric"``.
    param
        K for random-k, M for ba, the radius R for geometric; 0 for full.
    max_degree
        geometric only: at most this many neighbours per node (None: no cap).
    """

    kind: str = "full"
    param: float = 0
    max_degree: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown topology {self.kind!r}; allowed: {TOPOLOGY_ALLOWED}")
        if self.kind in ("random-k", "ba") and (self.param != int(self.param) or self.param < 1):
            raise ValueError(f"{self.kind} needs an integer >= 1, got {self.param}")
        if self.kind == "geometric" and not (math.isfinite(self.param) and self.param > 0):
            raise ValueError(f"geometric needs a radius R > 0, got {self.param}")
        if self.max_degree is not None and (self.kind != "geometric" or self.max_degree < 1):
            raise ValueError("a maximum degree is only for geometric:R:D, with D >= 1")

    @property
    def is_full(self) -> bool:
        return self.kind == "full"

    def build(self, n: int, seed: SeedLike = 0) -> Adjacency | None:
        """The graph on ``n`` nodes as adjacency lists; ``None`` for ``full`` (every node sees all)."""
        if n < 1:
            raise ValueError(f"a topology needs n >= 1 nodes, got {n}")
        if self.kind == "full":
            return None
        if self.kind == "random-k":
            return random_k(n, int(self.param), seed)
        if self.kind == "ba":
            return barabasi_albert(n, int(self.param), seed)
        return random_geometric(n, self.param, seed, max_degree=self.max_degree)

    def __str__(self) -> str:
        if self.kind == "full":
            return "full"
        if self.kind in ("random-k", "ba"):
            return f"{self.kind}:{int(self.param)}"
        tail = f":{self.max_degree}" if self.max_degree is not None else ""
        return f"geometric:{self.param:g}{tail}"


def parse_topology(spec: str) -> Topology:
    """Parse a ``--topology`` spec (module docstring); ValueError naming the allowed forms if invalid."""
    text = spec.strip().lower()
    if text in ("full", "complete", ""):
        return Topology("full")
    kind, _, rest = text.partition(":")
    parts = rest.split(":") if rest else []
    try:
        if kind in ("random-k", "ba") and len(parts) == 1:
            return Topology(kind, int(parts[0]))
        if kind == "geometric" and len(parts) in (1, 2):
            cap = int(parts[1]) if len(parts) == 2 else None
            return Topology(kind, float(parts[0]), cap)
    except ValueError as exc:
        raise ValueError(f"bad topology {spec!r} ({exc}); allowed: {TOPOLOGY_ALLOWED}") from None
    raise ValueError(f"bad topology {spec!r}; allowed: {TOPOLOGY_ALLOWED}")


# ----------------------------------------------------------------------------------------- generators
def _rng(seed: SeedLike) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(int(seed) % 2**63)


def _from_edges(n: int, edges: Sequence[tuple[int, int]] | Sequence[list[int]] | np.ndarray) -> Adjacency:
    """Sorted, symmetric, duplicate- and loop-free adjacency lists from undirected edges."""
    e = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    e = e[e[:, 0] != e[:, 1]]
    keys = np.sort(np.concatenate([e[:, 0] * n + e[:, 1], e[:, 1] * n + e[:, 0]]))  # by source, target
    if len(keys):
        keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])]
    src, dst = np.divmod(keys, n)
    cuts = np.searchsorted(src, np.arange(1, n))
    return [part.tolist() for part in np.split(dst, cuts)]


def complete(n: int) -> Adjacency:
    """Every node linked to every other (n² entries: for small n; ``full`` topologies skip it)."""
    return [[j for j in range(n) if j != i] for i in range(n)]


def random_k(n: int, k: int, seed: SeedLike = 0) -> Adjacency:
    """A random k-regular graph: a random pairing of k "stubs" per node, repaired by edge swaps.

    Self-loops and duplicate edges of the pairing are removed by double-edge swaps with random other
    pairs (the degrees stay k). With ``n*k`` odd node 0 gets one extra stub (degree k+1). ``k >= n-1``
    gives the complete graph. For k >= 3 a disconnected draw (rare) is redrawn, up to 20 times.
    """
    if k < 1:
        raise ValueError(f"random-k needs k >= 1, got {k}")
    if k >= n - 1:
        return complete(n)
    rng = _rng(seed)
    for _ in range(20):
        adj = _random_regular_once(n, k, rng)
        if k < 3 or is_connected(adj):
            return adj
    return adj


def _random_regular_once(n: int, k: int, rng: np.random.Generator) -> Adjacency:
    stubs = np.repeat(np.arange(n), k)
    if len(stubs) % 2:
        stubs = np.append(stubs, 0)
    rng.shuffle(stubs)
    pairs = stubs.reshape(-1, 2).tolist()
    count: dict[tuple[int, int], int] = {}
    for a, b in pairs:
        key = (min(a, b), max(a, b))
        count[key] = count.get(key, 0) + 1

    def bad(p: list[int]) -> bool:
        return p[0] == p[1] or count[(min(p), max(p))] > 1

    def drop(p: list[int]) -> None:
        key = (min(p), max(p))
        count[key] -= 1
        if not count[key]:
            del count[key]

    def ok(a: int, b: int) -> bool:
        return a != b and (min(a, b), max(a, b)) not in count

    todo = [i for i, p in enumerate(pairs) if bad(p)]
    guard = 0
    while todo:
        guard += 1
        if guard > 200 * (len(pairs) + 10):
            raise RuntimeError(f"could not draw a {k}-regular graph on {n} nodes")
        i = todo[-1]
        if not bad(pairs[i]):
            todo.pop()
            continue
        j = int(rng.integers(len(pairs)))
        if j == i:
            continue
        (a, b), (c, d) = pairs[i], pairs[j]
        if rng.random() < 0.5:
            c, d = d, c
        drop(pairs[i])
        drop(pairs[j])
        if ok(a, c) and ok(b, d) and (min(a, c), max(a, c)) != (min(b, d), max(b, d)):
            pairs[i], pairs[j] = [a, c], [b, d]
        for p in (pairs[i], pairs[j]):
            key = (min(p), max(p))
            count[key] = count.get(key, 0) + 1
    return _from_edges(n, pairs)


def barabasi_albert(n: int, m: int, seed: SeedLike = 0) -> Adjacency:
    """Barabási–Albert graph: nodes 0..m form a clique; each later node links to m distinct earlier nodes
    drawn with probability proportional to their degree. Connected; ``n <= m+1`` gives the complete graph."""
    if m < 1:
        raise ValueError(f"ba needs m >= 1, got {m}")
    if n <= m + 1:
        return complete(n)
    rng = _rng(seed)
    edges = [(i, j) for i in range(m + 1) for j in range(i + 1, m + 1)]
    repeated = [v for e in edges for v in e]  # node v appears degree(v) times
    for new in range(m + 1, n):
        targets: set[int] = set()
        while len(targets) < m:
            draws = rng.integers(len(repeated), size=m - len(targets))
            targets.update(repeated[int(d)] for d in draws)
        for t in sorted(targets):
            edges.append((new, t))
            repeated.extend((new, t))
    return _from_edges(n, edges)


def random_geometric(n: int, radius: float, seed: SeedLike = 0, max_degree: int | None = None) -> Adjacency:
    """Random geometric graph: n points uniform in the unit square, an edge where distance <= ``radius``.

    With ``max_degree`` D, candidate edges are taken shortest first and one is kept only while both
    ends have fewer than D neighbours, so no node has more than D. Expected degree without a cap is about
    ``n * pi * radius**2`` (less near the border). Connectivity is not guaranteed (see :func:`components`).
    """
    if not (math.isfinite(radius) and radius > 0):
        raise ValueError(f"geometric needs radius > 0, got {radius}")
    if max_degree is not None and max_degree < 1:
        raise ValueError(f"max_degree must be >= 1, got {max_degree}")
    rng = _rng(seed)
    points = rng.random((n, 2))
    ii, jj, dist = _pairs_within(points, radius)
    if max_degree is None:
        return _from_edges(n, np.stack([ii, jj], axis=1))
    order = np.lexsort((jj, ii, dist))  # shortest first; ties broken by the node indices
    deg = [0] * n
    kept = []
    for a, b in zip(ii[order].tolist(), jj[order].tolist()):
        if deg[a] < max_degree and deg[b] < max_degree:
            kept.append((a, b))
            deg[a] += 1
            deg[b] += 1
    return _from_edges(n, kept)


def geometric_positions(n: int, seed: SeedLike = 0) -> np.ndarray:
    """The ``(n, 2)`` points :func:`random_geometric` draws for the same ``n`` and int ``seed``."""
    return _rng(seed).random((n, 2))


def _pairs_within(points: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs i < j within ``radius``, by a grid of cells of side >= radius (3x3 cells checked)."""
    n = len(points)
    cells = max(1, min(int(1.0 / radius), 4096))
    cell = np.minimum((points * cells).astype(np.int64), cells - 1)
    key = cell[:, 0] * cells + cell[:, 1]
    order = np.argsort(key, kind="stable")
    sorted_keys = key[order]
    out_i, out_j, out_d = [], [], []
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            nx, ny = cell[:, 0] + dx, cell[:, 1] + dy
            valid = (nx >= 0) & (nx < cells) & (ny >= 0) & (ny < cells)
            nkey = nx * cells + ny
            lo = np.searchsorted(sorted_keys, nkey, side="left")
            hi = np.searchsorted(sorted_keys, nkey, side="right")
            counts = np.where(valid, hi - lo, 0)
            if counts.sum() == 0:
                continue
            src = np.repeat(np.arange(n), counts)
            starts = np.repeat(lo, counts)
            within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
            dst = order[starts + within]
            keep = src < dst
            src, dst = src[keep], dst[keep]
            d = np.linalg.norm(points[src] - points[dst], axis=1)
            close = d <= radius
            out_i.append(src[close])
            out_j.append(dst[close])
            out_d.append(d[close])
    if not out_i:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, np.empty(0)
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_d)


# ---------------------------------------------------------------------------------------- properties
def degrees(adj: Adjacency) -> list[int]:
    """Each node's number of neighbours."""
    return [len(a) for a in adj]


def edge_count(adj: Adjacency) -> int:
    """Number of undirected edges."""
    return sum(len(a) for a in adj) // 2


def components(adj: Adjacency) -> list[list[int]]:
    """Connected components (each sorted), largest first."""
    seen = [False] * len(adj)
    comps = []
    for s in range(len(adj)):
        if seen[s]:
            continue
        seen[s] = True
        stack, comp = [s], []
        while stack:
            v = stack.pop()
            comp.append(v)
            for w in adj[v]:
                if not seen[w]:
                    seen[w] = True
                    stack.append(w)
        comps.append(sorted(comp))
    comps.sort(key=len, reverse=True)
    return comps


def is_connected(adj: Adjacency) -> bool:
    """True when every node can reach every other (an empty or one-node graph is connected)."""
    return len(adj) <= 1 or len(components(adj)[0]) == len(adj)


def shortest_hops(adj: Adjacency, source: int) -> list[int]:
    """Hop distance from ``source`` to every node (-1 where unreachable), by breadth-first search."""
    dist = [-1] * len(adj)
    dist[source] = 0
    frontier = [source]
    while frontier:
        nxt = []
        for v in frontier:
            for w in adj[v]:
                if dist[w] < 0:
                    dist[w] = dist[v] + 1
                    nxt.append(w)
        frontier = nxt
    return dist


def k_nearest(points: np.ndarray, i: int, k: int) -> list[int]:
    """The ``k`` points nearest to point ``i`` (itself excluded), nearest first."""
    d = np.linalg.norm(points - points[i], axis=1)
    d[i] = np.inf
    return [int(j) for j in heapq.nsmallest(k, range(len(points)), key=lambda j: d[j])]


# -------------------------------------------------------------------------------------------- views
class PeerDirectory:
    """Everyone's membership record by node index, and who is up (the simulator's ground truth).

    ``set_alive(i, True)`` after ``set_alive(i, False)`` starts a new *generation* of node i, which
    clears every view's "unreachable" mark on it (it answered nothing while away; it is back now).
    """

    def __init__(self, records: Sequence[MembershipRecord]) -> None:
        self.records = list(records)
        self.index = {r.peer_id: i for i, r in enumerate(self.records)}
        self.alive = [True] * len(self.records)
        self.generation = [0] * len(self.records)
        self.alive_count = len(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def set_alive(self, i: int, up: bool) -> None:
        if self.alive[i] == up:
            return
        self.alive[i] = up
        self.alive_count += 1 if up else -1
        if up:
            self.generation[i] += 1


class _LiveList(Sequence[MembershipRecord]):
    """The live peers of a full view, without an n-element list until one is iterated or indexed."""

    def __init__(self, view: NeighbourView) -> None:
        self._view = view
        self._items: list[MembershipRecord] | None = None

    def _list(self) -> list[MembershipRecord]:
        if self._items is None:
            self._items = [self._view.directory.records[j] for j in self._view._live_indices()]
        return self._items

    def __len__(self) -> int:
        return self._view.live_count()

    @overload
    def __getitem__(self, i: int) -> MembershipRecord: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[MembershipRecord]: ...
    def __getitem__(self, i: int | slice) -> MembershipRecord | Sequence[MembershipRecord]:
        return self._list()[i]

    def __iter__(self) -> Iterator[MembershipRecord]:
        return iter(self._list())


class NeighbourView:
    """A :class:`p2pnode.node.PeerView` over a topology: only ``own``'s live neighbours are offered.

    Parameters
    ----------
    own
        This node's index in ``directory``.
    neighbours
        Indices of its neighbours in the topology; ``None`` means every other node (a ``full`` topology).
    directory
        Shared records and liveness (:class:`PeerDirectory`).
    rng
        Draws the peer samples (seed it per node for reproducible runs).

    A neighbour is live when the directory says it is up and this node has not marked it unreachable
    since it last came back (``mark_unreachable`` after a failed exchange; ``mark_alive`` or the peer's
    return clear the mark). ``live()`` of a full view is a lazy sequence: ``len()`` costs O(1) unless
    marks exist.
    """

    def __init__(self, own: int, neighbours: Sequence[int] | None, directory: PeerDirectory,
                 rng: random.Random) -> None:
        self.own = own
        self.neighbours = None if neighbours is None else [j for j in neighbours if j != own]
        self.directory = directory
        self.rng = rng
        self.rejected = 0
        self._down: dict[int, int] = {}  # peer index -> its generation when marked unreachable

    # -- liveness -----------------------------------------------------------------------------------
    def _is_live(self, j: int) -> bool:
        d = self.directory
        if not d.alive[j]:
            return False
        mark = self._down.get(j)
        return mark is None or mark != d.generation[j]

    def _live_indices(self) -> list[int]:
        candidates = range(len(self.directory)) if self.neighbours is None else self.neighbours
        return [j for j in candidates if j != self.own and self._is_live(j)]

    def live_count(self) -> int:
        """How many peers are live in this view."""
        if self.neighbours is not None:
            return sum(1 for j in self.neighbours if self._is_live(j))
        self._prune_marks()
        d = self.directory
        return d.alive_count - (1 if d.alive[self.own] else 0) - len(self._down)

    def _prune_marks(self) -> None:
        d = self.directory
        stale = [j for j, g in self._down.items() if not d.alive[j] or g != d.generation[j]]
        for j in stale:  # the directory already counts a dead peer; a returned peer is live again
            del self._down[j]

    def live(self) -> list[MembershipRecord]:
        """The live peers (a full view returns a lazy sequence with an O(1) ``len``)."""
        if self.neighbours is not None:
            return [self.directory.records[j] for j in self._live_indices()]
        return cast(list[MembershipRecord], _LiveList(self))

    def sample(self, k: int) -> list[MembershipRecord]:
        """Up to ``k`` distinct live peers, uniformly at random."""
        recs = self.directory.records
        if k <= 0:
            return []
        if self.neighbours is not None:
            live = self._live_indices()
            return [recs[j] for j in self.rng.sample(live, min(k, len(live)))]
        n = len(self.directory)
        live_n = self.live_count()
        if live_n <= 4 * k or live_n < n // 2:  # few live peers: list them
            live = self._live_indices()
            return [recs[j] for j in self.rng.sample(live, min(k, len(live)))]
        chosen: list[int] = []
        while len(chosen) < k:  # rejection sampling: most draws are live
            j = self.rng.randrange(n)
            if j != self.own and j not in chosen and self._is_live(j):
                chosen.append(j)
        return [recs[j] for j in chosen]

    def mark_unreachable(self, peer_id: str) -> None:
        j = self.directory.index.get(peer_id)
        if j is not None:
            self._down[j] = self.directory.generation[j]

    def mark_alive(self, peer_id: str) -> None:
        j = self.directory.index.get(peer_id)
        if j is not None:
            self._down.pop(j, None)

    async def refresh(self) -> list[MembershipRecord]:
        return list(self.live())

    async def run(self, state: Callable[[], tuple[int, bytes]], ready: asyncio.Event | None = None) -> None:
        if ready is not None:
            ready.set()
