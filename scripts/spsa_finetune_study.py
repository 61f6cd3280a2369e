#!/usr/bin/env python
"""Single-node one-byte SPSA (MeZO) fine-tuning of ``shakespeare-charlm``: held-out loss vs scalars.

Starts from the pretrained model with its identity logit adapter
(:class:`p2pnode.tasks.charlm.AdaptedCharGRU`), then for each scalar ``i``: draws a batch of
fine-tuning windows from one shard, takes the SPSA scalar of :func:`p2pnode.tasks.charlm.spsa_loss`
over :func:`p2pnode.spsa.spsa_parameters` (the 192 adapter values) with seed
``derive_seed(origin, i, 0)``, sends it through the one-byte code (``encode_scalar`` /
``decode_scalar``) and applies the decoded value, exactly as a swarm node would. Prints the held-out
loss (nats/char, last position of every *Henry V* / *Richard III* window, as the task's evaluation)
every ``--every`` scalars and the wall time per 1000 scalars; with ``--reference-steps N``, also the
first-order reference (Adam on the same adapter, same loss, N steps).

    python scripts/spsa_finetune_study.py [--scalars 10000] [--every 1000] [--shard 0 --shards 4]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from p2pnode.errors import TaskError
from p2pnode.spsa import apply_scalar_, spsa_parameters, spsa_scalar
from p2pnode.tasks.base import ShardSpec
from p2pnode.tasks.charlm import (
    SPSA_DEFAULTS,
    ShakespeareCharLMTask,
    evaluate_loss,
    prepare_spsa_batch,
    sample_windows,
    spsa_loss,
)
from p2pnode.trainer import limit_threads
from protocols.spsa import decode_scalar, derive_seed, encode_scalar


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="corpus location (default: the task's default)")
    parser.add_argument("--scalars", type=int, default=10000, help="SPSA scalars (default 10000)")
    parser.add_argument("--every", type=int, default=1000, help="report every this many scalars")
    parser.add_argument("--shard", type=int, default=0, help="fine-tuning shard index (default 0)")
    parser.add_argument("--shards", type=int, default=4, help="number of shards (default 4; 1: all)")
    parser.add_argument("--lr", type=float, default=SPSA_DEFAULTS.lr)
    parser.add_argument("--eps", type=float, default=SPSA_DEFAULTS.eps)
    parser.add_argument("--batch-size", type=int, default=SPSA_DEFAULTS.batch_size)
    parser.add_argument("--no-prepare", action="store_true",
                        help="pass raw windows to spsa_loss (GRU run twice per scalar)")
    parser.add_argument("--no-quantize", action="store_true", help="apply the exact scalar")
    parser.add_argument("--reference-steps", type=int, default=0, help="Adam steps on the adapter")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    limit_threads(args.threads)
    task = ShakespeareCharLMTask(args.data_dir)
    try:
        data = task.load(ShardSpec(index=args.shard, count=args.shards, seed=args.seed))
        model = task.build_model(args.seed).eval()
    except TaskError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n_params = sum(p.numel() for p in spsa_parameters(model))
    print(f"shard {args.shard}/{args.shards}: {len(data.train_y)} windows; SPSA on {n_params} values; "
          f"lr {args.lr}, eps {args.eps}, batch {args.batch_size} windows, "
          f"{'exact' if args.no_quantize else 'one-byte'} scalars")
    print(f"{'scalars':>8} {'held-out':>9} {'s/1000':>7}")
    print(f"{0:>8} {evaluate_loss(model, data.test_x, data.test_y):>9.4f}", flush=True)
    generator = torch.Generator().manual_seed(args.seed + 1)
    origin = f"study-{args.seed}"
    spent, magnitudes = 0.0, []
    for i in range(args.scalars):
        started = time.perf_counter()
        windows = sample_windows(data.train_x, data.train_y, args.batch_size, generator)
        batch = windows if args.no_prepare else prepare_spsa_batch(model, windows)
        seed = derive_seed(origin, i, 0)
        g = spsa_scalar(model, spsa_loss, batch, seed, eps=args.eps)
        magnitudes.append(abs(g))
        apply_scalar_(model, seed, g if args.no_quantize else decode_scalar(encode_scalar(g)), args.lr)
        spent += time.perf_counter() - started
        if (i + 1) % args.every == 0 or i + 1 == args.scalars:
            print(f"{i + 1:>8} {evaluate_loss(model, data.test_x, data.test_y):>9.4f} "
                  f"{1000 * spent / (i + 1):>7.1f}", flush=True)
    if magnitudes:
        m = torch.tensor(magnitudes)
        print(f"|g|: median {float(m.median()):.3g}, max {float(m.max()):.3g}; "
              f"{float((m < 3.35e-4).double().mean()):.1%} below the code's smallest magnitude 3.35e-4")
    if args.reference_steps:
        reference = task.build_model(args.seed)
        optimizer = torch.optim.Adam(spsa_parameters(reference), lr=0.01)
        for _ in range(args.reference_steps):
            windows = sample_windows(data.train_x, data.train_y, 64, generator)
            loss = spsa_loss(reference, prepare_spsa_batch(reference, windows))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        print(f"first-order reference (Adam lr 0.01, {args.reference_steps} steps of 64 windows, "
              f"adapter only): {evaluate_loss(reference.eval(), data.test_x, data.test_y):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
