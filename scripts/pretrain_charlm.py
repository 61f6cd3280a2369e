#!/usr/bin/env python
"""Pretrain the ``shakespeare-charlm`` model and report the losses that make fine-tuning worthwhile.

Trains :class:`p2pnode.tasks.charlm.CharGRU` with Adam on the comedies and romances, writes the
weights where the task's ``build_model`` looks for them (``$P2PNODE_CACHE`` or ``~/.cache/p2pnode``,
file ``shakespeare-charlm-pretrained.npz``; ``--out`` to change), then prints the held-out loss
(nats/char, on *Henry V* and *Richard III*) of a random init and of the pretrained model, and, with
``--finetune-steps N``, of the pretrained model after N first-order SGD steps on the fine-tuning
histories (with the project's ``LocalTrainer``).

    python scripts/pretrain_charlm.py [--data-dir DIR] [--steps 3000] [--finetune-steps 300]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

from p2pnode.errors import TaskError
from p2pnode.tasks.base import ShardSpec, TaskData
from p2pnode.tasks.charlm import (
    TEST_FILES,
    PretrainRecipe,
    ShakespeareCharLMTask,
    evaluate_loss,
    make_windows,
    pretrain,
    save_weights,
    sequence_loss,
)
from p2pnode.trainer import LocalTrainer, limit_threads


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="corpus location (default: the task's default)")
    parser.add_argument("--out", help="weights file (default: the task's default)")
    parser.add_argument("--steps", type=int, default=3000, help="Adam steps (default 3000)")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="time budget (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--finetune-steps", type=int, default=0, help="SGD fine-tune check steps")
    parser.add_argument("--finetune-lr", type=float, default=0.003, help="SGD lr (momentum 0.9)")
    parser.add_argument("--skip-pretrain", action="store_true", help="use the existing weights file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    limit_threads(args.threads)
    task = ShakespeareCharLMTask(args.data_dir, weights=args.out)
    try:
        texts = task.texts()
    except TaskError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    test_x, test_y = make_windows([texts[f] for f in TEST_FILES])
    random_loss = evaluate_loss(ShakespeareCharLMTask(pretrained=False).build_model(args.seed).eval(),
                                test_x, test_y)
    if not args.skip_pretrain:
        started = time.perf_counter()
        recipe = PretrainRecipe(steps=args.steps, max_seconds=args.max_seconds, seed=args.seed)
        save_weights(pretrain(texts, recipe), task.weights)
        if not task.weights.is_file():
            print(f"error: could not write {task.weights}", file=sys.stderr)
            return 1
        print(f"pretrained in {time.perf_counter() - started:.0f} s ({torch.get_num_threads()} threads); "
              f"weights: {task.weights}")
    model = task.build_model(args.seed).eval()
    print(f"held-out loss (nats/char, {len(test_y)} windows of {', '.join(TEST_FILES)}):")
    print(f"  random init        {random_loss:.3f}")
    print(f"  pretrained         {evaluate_loss(model, test_x, test_y):.3f}")
    if args.finetune_steps:
        data = task.load(ShardSpec())
        trainer = LocalTrainer(task.build_model(args.seed), data, lr=args.finetune_lr, momentum=0.9,
                               batch_size=64, device=torch.device("cpu"), seed=args.seed)
        trainer.train_steps(args.finetune_steps)
        print(f"  + {args.finetune_steps} SGD steps, last-position loss (LocalTrainer)  "
              f"{trainer.evaluate()[1]:.3f}")
        tuned = _sgd_sequence(task.build_model(args.seed), data, args.finetune_steps, args.seed)
        print(f"  + {args.finetune_steps} SGD steps, all-position loss (sequence_loss)  "
              f"{evaluate_loss(tuned, test_x, test_y):.3f}")
    return 0


def _sgd_sequence(model: torch.nn.Module, data: TaskData, steps: int, seed: int) -> torch.nn.Module:
    """Plain SGD (lr 0.3, momentum 0.9) with :func:`sequence_loss` on random fine-tuning windows."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(data.train_y), (64,), generator=generator)
        loss = sequence_loss(model, (data.train_x[idx], data.train_y[idx]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return model.eval()


if __name__ == "__main__":
    sys.exit(main())
