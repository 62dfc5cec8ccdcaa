"""fcmae-stats: the command line of `fcmae.data.stats` (its docstring is the command's description)."""

from __future__ import annotations

import argparse
from typing import Sequence

from .exits import module_docstring, run_cli

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fcmae-stats", description=module_docstring("data/stats.py"),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_path", help="anything --data-path accepts (folder, shards, demo)")
    parser.add_argument("--in-chans", type=int, default=3, help="channels per image (default: 3)")
    parser.add_argument("--samples", type=int, default=1000, help="images to read (default: 1000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from ..data import stats as data_stats  # after the flags: --help answers before torch imports

    def run(_):
        stats = data_stats.channel_stats(args.data_path, args.in_chans, args.samples, args.seed)
        skipped = f" ({len(stats.unreadable)} unreadable skipped)" if stats.unreadable else ""
        print(f"# {stats.images} images of {args.data_path}{skipped}\n"
              f"mean: [{', '.join(f'{m:.4f}' for m in stats.mean)}]\n"
              f"std: [{', '.join(f'{s:.4f}' for s in stats.std)}]")

    return run_cli(run, [])
