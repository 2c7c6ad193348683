"""Summarise py-spy ``--format raw`` (collapsed stacks) output.

    python bench/collapse.py FILE [--match flask_bits] [--top 30]

Prints, per function, the share of samples where it is on the stack (inclusive) and
where it is the innermost frame (self), so a wall-clock profile reads like pstats.
"""

from __future__ import annotations

import argparse
import collections
import sys


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("file")
    p.add_argument("--match", default="", help="only list functions whose frame has this")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--under", default="", help="only count stacks that contain this frame")
    args = p.parse_args()
    incl: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    with open(args.file) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            if args.under and args.under not in stack:
                continue
            n = int(count)
            total += n
            frames = stack.split(";")
            for fr in set(frames):
                incl[fr] += n
            own[frames[-1]] += n
    if not total:
        print("no samples")
        return 1
    print(f"{total} samples" + (f" under {args.under!r}" if args.under else ""))
    print(f"{'incl%':>6} {'self%':>6}  function")
    for fr, n in incl.most_common():
        if args.match and args.match not in fr:
            continue
        print(f"{100 * n / total:6.1f} {100 * own[fr] / total:6.1f}  {fr}")
        args.top -= 1
        if args.top <= 0:
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
