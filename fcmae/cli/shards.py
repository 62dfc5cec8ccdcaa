"""fcmae-shards: the command line of `fcmae.data.shard_writer` (its docstring is the command's description)."""

from __future__ import annotations

import argparse
from typing import Sequence

from .exits import module_docstring, run_cli

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fcmae-shards", description=module_docstring("data/shard_writer.py"),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="image folder (searched recursively)")
    parser.add_argument("output", help="folder for the shards and dataset.json")
    parser.add_argument("--prefix", default="train", help="shard file names: PREFIX-000000.tar (default: train)")
    parser.add_argument("--maxcount", type=int, default=1000, help="samples per shard (default: 1000)")
    parser.add_argument("--maxsize", type=float, default=1e9, help="bytes per shard at most (default: 1e9)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffled file order (default: 0)")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the sorted file order")
    args = parser.parse_args(argv)
    from ..data import shard_writer  # after the flags: --help answers before torch imports

    def run(_):
        shards = shard_writer.write_shards(args.source, args.output, args.prefix, args.maxcount, args.maxsize, args.seed,
                              not args.no_shuffle)
        total = sum(s["nsamples"] for s in shards)
        last = len(shards) - 1
        print(f"wrote {total} samples in {len(shards)} shards: {args.output}/{args.prefix}-{{000000..{last:06d}}}.tar "
              f"(and {shard_writer.DESCRIPTOR})")

    return run_cli(run, [])
