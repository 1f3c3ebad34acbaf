"""Sample a daphne process with py-spy during measured steps (``--profile``).

The raw samples go to a file (one ``stack count`` line each, the input of
flamegraph.pl); the results keep the functions with the most samples, on top of
the stack (self) and anywhere in it (inclusive). Idle threads are left out; a
thread waiting for the GIL is not, and shows on the line that released it (a
socket write of the event loop while the database thread runs, say).
"""

import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

SAMPLE_RATE = 200
TOP = 15


def available():
    return shutil.which(
        "py-spy", path=str(Path(sys.executable).parent)
    ) or shutil.which("py-spy")


class Recording:
    """``py-spy record`` of ``pid`` until ``finish``, without pausing the process."""

    def __init__(self, pid, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        command = [available(), "record", "--pid", str(pid), "--rate"]
        command += [str(SAMPLE_RATE), "--format", "raw", "--output", str(self.path)]
        command += ["--nonblocking"]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def finish(self):
        # py-spy writes what it sampled when interrupted, as after Ctrl-C.
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        return summarize(self.path)


def summarize(path):
    """The functions with the most samples, as shares of all samples."""
    own, inclusive, total = Counter(), Counter(), 0
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        count = int(count)
        total += count
        frames = [frame for frame in stack.split(";") if frame.strip()]
        if frames:
            own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return None

    def top(counter):
        return [
            [round(100 * n / total, 1), name] for name, n in counter.most_common(TOP)
        ]

    return {
        "file": str(path),
        "samples": total,
        "self": top(own),
        "inclusive": top(inclusive),
    }
