#!/usr/bin/env python3
"""Run a command and report the peak of the summed resident memory of it and all its descendants.

    python scripts/peak_rss.py bash scripts/run_main.sh

`/usr/bin/time -v` reports the largest single process; when a job runs several processes at once (the main job's
data-parallel training stages) what the machine must hold is their sum. This samples /proc every 0.2 s (Linux
only), so a spike shorter than that can be missed; shared pages are counted once per process (an upper bound).
Exits with the command's status.
"""

import os
import subprocess
import sys
import time


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(parent, []).append(int(entry))
    return tree


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def tree_rss(root: int) -> tuple[int, int]:
    """(summed RSS in bytes, process count) of ``root`` and its descendants."""
    tree, todo, total, count = _children(), [root], 0, 0
    while todo:
        pid = todo.pop()
        total, count = total + _rss_bytes(pid), count + 1
        todo.extend(tree.get(pid, []))
    return total, count


def main(argv: list[str]) -> int:
    if not argv:
        raise SystemExit("usage: python scripts/peak_rss.py COMMAND [ARGS...]")
    proc = subprocess.Popen(argv)
    peak, peak_count = 0, 0
    while proc.poll() is None:
        total, count = tree_rss(proc.pid)
        if total > peak:
            peak, peak_count = total, count
        time.sleep(0.2)
    print(f"[peak_rss] peak of the summed resident memory of the command's processes: {peak / 2**30:.2f} GiB "
          f"({peak_count} processes at that moment; sampled every 0.2 s)", file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
