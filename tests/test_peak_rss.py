"""scripts/peak_rss.py: the README's peak-memory figure of the main job, whose training stages run two processes at
once, is the peak of their summed resident memory, not the largest process's (what `/usr/bin/time -v` reports)."""

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "peak_rss.py"
HOLD = "import sys, time; block = bytearray(int(sys.argv[1]) * 2**20); block[::4096] = b'x' * len(block[::4096]); " \
       "time.sleep(2.0)"


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="peak_rss.py reads Linux's /proc")
def test_peak_rss_sums_concurrent_children_and_passes_the_exit_status():
    # a parent holding nothing that starts two children holding 150 MiB each at the same time, then exits with 3
    parent = textwrap.dedent(f"""
        import subprocess, sys
        hold = {HOLD!r}
        children = [subprocess.Popen([sys.executable, "-c", hold, "150"]) for _ in range(2)]
        for child in children:
            child.wait()
        sys.exit(3)
    """)
    done = subprocess.run([sys.executable, str(SCRIPT), sys.executable, "-c", parent], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 3
    peak, count = re.search(r"memory of the command's processes: ([\d.]+) GiB \((\d+) processes", done.stderr).groups()
    assert int(count) == 3  # the parent and both children
    assert 0.30 < float(peak) < 0.60  # 2 x 150 MiB held, plus three interpreters; a single child would be ~0.16


def test_peak_rss_needs_a_command():
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode != 0 and "usage: python scripts/peak_rss.py COMMAND" in done.stderr
