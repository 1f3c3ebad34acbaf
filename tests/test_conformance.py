"""The Autobahn TestSuite's cases (kosoku) against the echo endpoint on daphne.

Every case but 12.* and 13.* (permessage-deflate, which daphne does not
negotiate), with the fast path on and with ``CHAT_FAST_PATH=0``. Both paths get
the same verdicts: the ones ``docs/conformance.md`` records and explains.
"""

import collections
import re
import time

import pytest

from tests.conformance.run import fuzzingclient
from tests.conformance.server import EchoServer
from tests.servers import ROOT

# Cases run, by section (the first number of the case id).
CASES_PER_SECTION = {
    "1": 16,
    "2": 11,
    "3": 7,
    "4": 10,
    "5": 20,
    "6": 145,
    "7": 37,
    "9": 54,
    "10": 1,
}
NON_STRICT = ("NON-STRICT", "OK")
INFORMATIONAL = ("INFORMATIONAL", "INFORMATIONAL")
# (behavior, behaviorClose) of every case not ("OK", "OK").
NOT_OK = {
    "3.2": NON_STRICT,
    "3.3": NON_STRICT,
    "3.4": NON_STRICT,
    "4.1.3": NON_STRICT,
    "4.1.4": NON_STRICT,
    "4.1.5": NON_STRICT,
    "4.2.3": NON_STRICT,
    "4.2.4": NON_STRICT,
    "4.2.5": NON_STRICT,
    "5.15": NON_STRICT,
    "7.1.6": INFORMATIONAL,
    "7.13.1": INFORMATIONAL,
    "7.13.2": INFORMATIONAL,
}
BEHAVIORS = {"OK": 288, "NON-STRICT": 10, "INFORMATIONAL": 3}
SUMMARIES = {
    "on": "fast path on "
    "(daphne 4.2.3, autobahn 26.11.1, twisted 26.10.0, txaio 26.6.1)",
    "off": "fast path off: CHAT_FAST_PATH=0",
}


def section(case_id):
    return case_id.split(".")[0]


def section_rows():
    """``(section, cases, OK, NON-STRICT, INFORMATIONAL)``: the docs' table rows."""
    rows = []
    for name, cases in CASES_PER_SECTION.items():
        behaviors = collections.Counter(
            behavior for case, (behavior, _) in NOT_OK.items() if section(case) == name
        )
        non_strict, informational = behaviors["NON-STRICT"], behaviors["INFORMATIONAL"]
        ok = cases - non_strict - informational
        rows.append((name, cases, ok, non_strict, informational))
    return rows


@pytest.mark.parametrize("path", ["on", "off"])
def test_every_case_gets_the_verdict_docs_conformance_md_records(path, tmp_path):
    server = EchoServer(fast_path=path == "on").start()
    try:
        started = time.monotonic()
        reports = fuzzingclient(server.ws_url, tmp_path)
        print(f"{len(reports)} cases in {time.monotonic() - started:.1f}s")
        assert server.alive(), f"daphne died:\n{server.output()}"
        assert SUMMARIES[path] in server.output().splitlines()
    finally:
        server.stop()

    verdicts = {
        case: (report["behavior"], report["behaviorClose"])
        for case, report in reports.items()
    }
    assert collections.Counter(map(section, verdicts)) == CASES_PER_SECTION
    not_ok = {
        case: verdict for case, verdict in verdicts.items() if verdict != ("OK", "OK")
    }
    assert not_ok == NOT_OK, f"kosoku's report: {tmp_path}/index.html"
    assert (
        collections.Counter(behavior for behavior, _ in verdicts.values()) == BEHAVIORS
    )


def test_docs_conformance_md_records_the_verdicts_asserted_here():
    text = (ROOT / "docs" / "conformance.md").read_text()
    cases = re.findall(r"^\| ([\d.]+) \| ([A-Z-]+) \| ([A-Z-]+) \|", text, re.M)
    assert {case: (behavior, close) for case, behavior, close in cases} == NOT_OK
    rows = re.findall(
        r"^\| (\d+) \| [^|]+ \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|", text, re.M
    )
    assert [(name, *map(int, counts)) for name, *counts in rows] == section_rows()
    total = sum(CASES_PER_SECTION.values())
    ok, non_strict = BEHAVIORS["OK"], BEHAVIORS["NON-STRICT"]
    informational = BEHAVIORS["INFORMATIONAL"]
    assert f"\n| all | | {total} | {ok} | {non_strict} | {informational} |\n" in text
