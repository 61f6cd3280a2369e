"""In-memory simulator of the 8-node fashion-mnist codec swarm (exchange math only, no network).

Local training is the daemon's own: the task's shards (ShardSpec(i, n, "iid", seed)), the same initial
model for every node (task.build_model(seed)), LocalTrainer with the config defaults (lr 0.05,
heavy-ball momentum 0.9, batch 32, sampler seed seed*100_003 + i, no validation split), H local steps per
round, momentum buffers kept across rounds and merges applied to the weights only -- as in
p2pnode/inproc.py::_build_trainer and p2pnode/node.py::Node.run_round.

Rounds are synchronous (all nodes train, then all exchanges of the round happen on the post-training
models). Compression uses the project's codec (protocols.codecs.make_codec), so values are fp16-scaled
exactly as on the wire and the payload bytes are the real encoded lengths; every message is charged
ENVELOPE bytes on top.

Usage: .venv/bin/python scripts/topk_study_sim.py SCHEME [options]   (see --help); results are appended
to runs/topk-study.jsonl. This is the study behind ``--mode increments`` (docs/topk-study.md), kept so its
figures can be reproduced; it is not the daemon and not the simulator of the simulation issue.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from p2pnode.node import model_layers  # noqa: E402
from p2pnode.tasks import ShardSpec, make_task  # noqa: E402
from p2pnode.trainer import LocalTrainer  # noqa: E402
from protocols.codecs import Layout, make_codec  # noqa: E402

ENVELOPE = 150  # signed envelope + msgpack framing per message (brief's figure)
RESULTS = ROOT / "runs" / "topk-study.jsonl"


class Comp:
    """Encode/decode through the project's codec; counts payload bytes."""

    def __init__(self, spec: str, layout: Layout, warmup: list[float] | None = None,
                 cooldown: list[float] | None = None, rounds: int = 0) -> None:
        self.spec, self.layout = spec, layout
        self.codec = make_codec(spec)
        self.warmup = warmup or []  # densities for the first len(warmup) rounds (topk only)
        self.cooldown = cooldown or []  # densities for the last len(cooldown) rounds
        self.rounds = rounds

    def __call__(self, x: torch.Tensor, rnd: int = 10**9) -> tuple[torch.Tensor, int]:
        codec = self.codec
        if self.spec.startswith("topk") and rnd < len(self.warmup):
            codec = make_codec(f"topk:{self.warmup[rnd]}")
        late = rnd - (self.rounds - len(self.cooldown))
        if self.spec.startswith("topk") and self.cooldown and 0 <= late < len(self.cooldown) and rnd < 10**8:
            codec = make_codec(f"topk:{self.cooldown[late]}")
        payload = codec.encode(x.contiguous(), self.layout)
        return codec.decode(payload, self.layout), len(payload)


def build(seed: int, n: int, lr: float, momentum: float, batch: int, task_name: str = "fashion-mnist"):
    task = make_task(task_name, None)
    trainers = []
    for i in range(n):
        data = task.load(ShardSpec(index=i, count=n, partition="iid", seed=seed))
        trainers.append(LocalTrainer(task.build_model(seed), data, lr=lr, momentum=momentum, batch_size=batch,
                                     device=torch.device("cpu"), seed=seed * 100_003 + i, val_fraction=0.0))
    layout = Layout(shapes=tuple(la.shape for la in model_layers(trainers[0].model)))
    return trainers, layout


def mom_flat(tr: LocalTrainer) -> list[torch.Tensor] | None:
    bufs = [tr.optimizer.state.get(p, {}).get("momentum_buffer") for p in tr.model.parameters()]
    return None if any(b is None for b in bufs) else bufs


def mask_momentum(tr: LocalTrainer, mask: torch.Tensor) -> None:
    """Zero the momentum buffer where ``mask`` (flat bool) is True (DGC momentum factor masking)."""
    v = momentum_vec(tr)
    if v is not None:
        set_momentum(tr, v.masked_fill(mask, 0.0))


def momentum_vec(tr: LocalTrainer) -> torch.Tensor | None:
    bufs = mom_flat(tr)
    return None if bufs is None else torch.cat([b.reshape(-1) for b in bufs])


def set_momentum(tr: LocalTrainer, v: torch.Tensor) -> None:
    bufs = mom_flat(tr)
    if bufs is None:
        return
    off = 0
    with torch.no_grad():
        for b in bufs:
            b.copy_(v[off:off + b.numel()].view_as(b))
            off += b.numel()


def pick_peers(rngs, n, fanout):
    """Node i's peers this round, like FullView.sample (live list in registry order, self excluded)."""
    return [rngs[i].sample([j for j in range(n) if j != i], min(fanout, n - 1)) for i in range(n)]


# --------------------------------------------------------------------------------------------------
def run(a) -> dict:
    torch.manual_seed(a.seed)
    trainers, layout = build(a.seed, a.nodes, a.lr, a.momentum, a.batch)
    n, R, H = a.nodes, a.rounds, a.local_steps
    d = layout.numel
    x0 = trainers[0].get_flat()
    warm = [float(w) for w in a.warmup.split(",")] if a.warmup else []
    cool = [float(w) for w in a.cooldown.split(",")] if a.cooldown else []
    comp = Comp(a.codec, layout, warm, cool, R)
    sent_bytes = [0] * n
    msgs = [0] * n
    rngs = [random.Random(f"{a.seed}/{i}") for i in range(n)]
    curve = []
    scheme = a.scheme
    dense_b = len(make_codec("dense").encode(x0, layout))

    def send(i, nbytes, copies=1):
        sent_bytes[i] += copies * (nbytes + ENVELOPE)
        msgs[i] += copies

    # per-scheme state
    if scheme == "gossip-peredge":
        ref = {}  # (i, j) -> r_ij : what j holds of i
    if scheme in ("choco", "pubgossip"):
        hat = [x0.clone() for _ in range(n)]
    if scheme == "fedavg":
        G = x0.clone()
        err = [torch.zeros(d) for _ in range(n)]
        gmom = torch.zeros(d)
    if scheme == "choco" and a.hat_momentum:
        pass

    for r in range(R):
        # ---------------- local training
        if scheme == "fedavg":
            starts = []
            for i, tr in enumerate(trainers):
                s = G + err[i] if a.start == "G+e" else G.clone()
                tr.set_flat_(s)
                if a.mom == "reset":
                    tr.reset_momentum()
                starts.append(s)
        for tr in trainers:
            tr.train_steps(H)
        xs = [tr.get_flat() for tr in trainers]

        # ---------------- exchange
        if scheme == "none":
            pass

        elif scheme == "gossip":  # dense push-pull gossip, mean of own + pulled + pushed
            peers = pick_peers(rngs, n, a.fanout)
            inputs = [set([i]) for i in range(n)]
            for i in range(n):
                for j in peers[i]:
                    inputs[i].add(j)  # pulled
                    inputs[j].add(i)  # pushed to j
                    send(i, dense_b)  # push
                    send(j, dense_b)  # reply
            for i in range(n):
                merged = torch.stack([xs[k] for k in sorted(inputs[i])]).mean(0)
                trainers[i].add_flat_(merged - xs[i])

        elif scheme == "gossip-peredge":  # today's daemon scheme (DESIGN §3): per-edge refs, r_ji - r_ij
            peers = pick_peers(rngs, n, a.fanout)
            pairs = []
            seen = set()
            for i in range(n):
                for j in peers[i]:
                    key = (min(i, j), max(i, j))
                    if key in seen:  # both pushed to each other: one exchange survives (busy rule)
                        continue
                    seen.add(key)
                    pairs.append((i, j))
            kept = [dict() for _ in range(n)]
            for i, j in pairs:  # i requests, j replies
                for s, t in ((i, j), (j, i)):
                    rst = ref.setdefault((s, t), x0.clone())
                    q, nb = comp(xs[s] - rst)
                    ref[(s, t)] = rst + q
                    send(s, nb)
                for s, t in ((i, j), (j, i)):  # t keeps s's input as offset r_st - r_ts
                    kept[t][s] = ref[(s, t)] - ref[(t, s)]
            for i in range(n):
                if kept[i]:
                    ins = [xs[i]] + [xs[i] + off for off in kept[i].values()]
                    merged = torch.stack(ins).mean(0)
                    trainers[i].add_flat_(merged - xs[i])

        elif scheme == "choco":  # (A) public copies, all-to-all
            qs = []
            for i in range(n):
                q, nb = comp(xs[i] - hat[i], r)
                send(i, nb, copies=n - 1)
                qs.append(q)
                if a.mask:
                    mask_momentum(trainers[i], q != 0)
            for i in range(n):
                hat[i] += qs[i]
            mean_hat = torch.stack(hat).mean(0)
            for i in range(n):
                trainers[i].add_flat_(a.gamma * (mean_hat - hat[i]))

        elif scheme == "pubgossip":  # (C) public copies, but consensus only with the fanout-sampled peers
            qs = []
            for i in range(n):
                q, nb = comp(xs[i] - hat[i], r)
                send(i, nb, copies=n - 1)
                qs.append(q)
            for i in range(n):
                hat[i] += qs[i]
            peers = pick_peers(rngs, n, a.fanout)
            inputs = [set([i]) for i in range(n)]
            for i in range(n):
                for j in peers[i]:
                    inputs[i].add(j)
                    inputs[j].add(i)
            for i in range(n):
                m = torch.stack([hat[k] for k in sorted(inputs[i])]).mean(0)
                trainers[i].add_flat_(a.gamma * (m - hat[i]))

        elif scheme == "fedavg":  # (B) shared G, error feedback
            qs = []
            for i in range(n):
                u = err[i] + (xs[i] - starts[i])
                q, nb = comp(u, r)
                err[i] = u - q
                send(i, nb, copies=n - 1)
                qs.append(q)
                if a.mask:
                    mask_momentum(trainers[i], q != 0)
            gmom = a.server_mom * gmom + torch.stack(qs).mean(0)
            G = G + a.server_lr * gmom
            if r == R - 1:  # final model of each node: what it would start the next round from
                for i, tr in enumerate(trainers):
                    tr.set_flat_(G + err[i] if a.final == "G+e" else (G if a.final == "G" else xs[i]))
        else:
            raise SystemExit(f"unknown scheme {scheme}")

        if a.curve and (r + 1) % a.curve == 0:
            acc = sum(tr.evaluate(2000)[0] for tr in trainers) / n
            curve.append((r + 1, round(acc, 4)))
            print(f"  round {r + 1}: mean acc@2000 {acc:.4f}", flush=True)

    finals = [tr.evaluate(None)[0] for tr in trainers]
    extra = {}
    if scheme == "fedavg":  # also score G and G+e_i regardless of what the nodes keep
        t0 = trainers[0]
        keep = t0.get_flat()
        t0.set_flat_(G)
        extra["acc_G"] = t0.evaluate(None)[0]
        t0.set_flat_(keep)
    if scheme in ("choco", "pubgossip"):
        t0 = trainers[0]
        keep = t0.get_flat()
        t0.set_flat_(torch.stack(hat).mean(0))
        extra["acc_mean_hat"] = t0.evaluate(None)[0]
        t0.set_flat_(keep)
    xm = torch.stack([tr.get_flat() for tr in trainers])
    extra["spread"] = float((xm - xm.mean(0)).norm(dim=1).mean() / xm.mean(0).norm())
    return {"acc_mean": sum(finals) / n, "acc_min": min(finals), "accs": [round(f, 4) for f in finals],
            "bytes_per_node": sum(sent_bytes) / n, "msgs_per_node_round": sum(msgs) / n / R,
            "curve": curve, **extra}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("scheme", choices=["none", "gossip", "gossip-peredge", "choco", "pubgossip", "fedavg"])
    p.add_argument("--codec", default="topk:0.01")
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--start", default="G", choices=["G", "G+e"])
    p.add_argument("--final", default="G+e", choices=["G", "G+e", "x"])
    p.add_argument("--mom", default="keep", choices=["keep", "reset"])
    p.add_argument("--mask", action="store_true", help="DGC momentum factor masking on sent coordinates")
    p.add_argument("--hat-momentum", action="store_true")
    p.add_argument("--server-lr", type=float, default=1.0)
    p.add_argument("--server-mom", type=float, default=0.0)
    p.add_argument("--warmup", default="", help="comma-separated topk densities for the first rounds")
    p.add_argument("--cooldown", default="", help="comma-separated topk densities for the last rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--local-steps", type=int, default=20)
    p.add_argument("--fanout", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--curve", type=int, default=0)
    p.add_argument("--tag", default="")
    a = p.parse_args()
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    t0 = time.time()
    res = run(a)
    res["wall_s"] = round(time.time() - t0, 1)
    res["args"] = vars(a)
    res["cmd"] = " ".join(sys.argv[1:])
    print(json.dumps(res))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
