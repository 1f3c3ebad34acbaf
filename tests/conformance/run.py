"""Run kosoku's fuzzingclient (the Autobahn cases) and read its JSON report."""

import json
import subprocess
import sysconfig
from pathlib import Path

# permessage-deflate (12.*, 13.*): daphne does not negotiate it.
EXCLUDED = ("12.*", "13.*")
# The whole run takes about 15 s; the longest case, under a second.
RUN_TIMEOUT = 300


def fuzzingclient(url: str, outdir: Path) -> dict[str, dict]:
    """Each case's report by case id, for every case but ``EXCLUDED``, against ``url``.

    kosoku exits with 1 when a case fails; that is a result to read, not an error.
    The report (JSON and HTML, Autobahn's format) stays in ``outdir``.
    """
    kosoku = Path(sysconfig.get_path("scripts")) / "kosoku"
    command = [str(kosoku), url, "-o", str(outdir)]
    for pattern in EXCLUDED:
        command += ["-x", pattern]
    run = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    index = outdir / "index.json"
    if not index.exists():
        raise AssertionError(
            f"kosoku wrote no report (exit {run.returncode}):\n{run.stdout}{run.stderr}"
        )
    # One agent: the server under test, named by its Server header.
    (cases,) = json.loads(index.read_text()).values()
    return {
        case_id: json.loads((outdir / entry["reportfile"]).read_text())
        for case_id, entry in cases.items()
    }
