"""Run one command and report its wall time and peak RSS, for :func:`bench.common.run_measured`.

Usage: ``python -m bench.measure CMD...``; the command's stdout is discarded, its stderr
passed through, and ``{"wall": s, "rss": bytes, "cpu": s, "rc": code}`` printed on stdout (cpu: user + system).

Why a separate process: on Linux a process's peak RSS (``ru_maxrss``) starts from the
high-water mark of the memory it was forked from, so a command forked by a benchmark that
holds 400 MB reports at least 400 MB. Forked from this small launcher instead, it reports
its own peak.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def main(argv: list[str]) -> int:
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    print(json.dumps({"wall": wall, "rss": usage.ru_maxrss * 1024, "cpu": usage.ru_utime + usage.ru_stime,
                      "rc": os.waitstatus_to_exitcode(status)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
