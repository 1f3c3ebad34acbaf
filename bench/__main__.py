"""Benchmark chatsite (and the tutorial's plain Channels chat): ``make bench``.

    python -m bench [--servers N] [--clients K] [--baseline | --compare]
                    [--scenario fanout100,...,joinstorm,reconnectstorm] [--quick]
                    [--fast-path on|off]

Starts its own redis-server and N daphne processes (pinned to the first core),
a database of its own (SQLite, or ``chatsite_bench`` when DATABASE_URL is a
PostgreSQL URL), loads them from K client processes (pinned to the other
cores), prints one markdown table and writes the figures to
bench/results/latest.json. Progress goes to stderr.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from bench import profile, report, scenarios
from bench.stack import (
    ROOT,
    SERVERS,
    Database,
    baseline_env,
    chatsite_env,
    cpu_layout,
    raise_open_files_limit,
)

RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--servers", type=int, default=2, help="server processes (2)")
    parser.add_argument(
        "--server",
        choices=SERVERS,
        default="daphne",
        help="the ASGI server (daphne; uvicorn needs requirements-bench.txt)",
    )
    parser.add_argument(
        "--backlog",
        type=int,
        help="the servers' listen backlog (default: the server's own, daphne 50)",
    )
    parser.add_argument("--clients", type=int, default=2, help="client processes (2)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--baseline", action="store_true", help="the tutorial consumer only"
    )
    which.add_argument(
        "--compare", action="store_true", help="chatsite and the baseline"
    )
    parser.add_argument(
        "--scenario",
        default=",".join(scenarios.SCENARIOS),
        help="comma-separated, from: " + ", ".join(scenarios.SCENARIOS),
    )
    parser.add_argument("--quick", action="store_true", help="short smoke run (~2 min)")
    parser.add_argument(
        "--fast-path",
        choices=("on", "off"),
        default="on",
        help="chat.serving's fast path in chatsite's servers (off: CHAT_FAST_PATH=0)",
    )
    parser.add_argument(
        "--output", type=Path, default=RESULTS, help="JSON results file"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="sample the first server with py-spy in every step, raw stacks to DIR",
    )
    options = parser.parse_args(argv)
    options.scenarios = [s.strip() for s in options.scenario.split(",") if s.strip()]
    unknown = set(options.scenarios) - set(scenarios.SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    options.durations = scenarios.Durations.for_run(options.quick)
    if options.profile is not None and not profile.available():
        parser.error("--profile needs py-spy (pip install -r requirements-bench.txt)")
    return options


def seed_spec(durations):
    """Users and rooms for every scenario; user i is socket i of a scenario."""
    rooms = {
        "fan100": list(range(100)),
        "fan1000": list(range(1000)),
        "persist": list(range(scenarios.PERSIST_SENDERS)),
    }
    members = scenarios.ROOM_MEMBERS
    for k in range(scenarios.ROOMS):
        rooms[f"r{k:03d}"] = list(range(k * members, (k + 1) * members))
    rooms[scenarios.JOINSTORM_ROOM] = list(range(durations.storm_sockets))
    # The reconnect storm: members already, as after a deploy.
    big = durations.reconnect_big
    rooms[scenarios.RECONNECT_BIG_ROOM] = list(range(big))
    small = scenarios.RECONNECT_SMALL_USERS
    for k in range(durations.reconnect_rooms):
        rooms[f"rs{k:03d}"] = list(range(big + k * small, big + (k + 1) * small))
    users = big + durations.reconnect_rooms * small
    per_room = scenarios.IDLE_PER_ROOM
    for k in range(durations.idle_sockets // per_room):
        rooms[f"idle{k:04d}"] = list(range(k * per_room, (k + 1) * per_room))
    users = max(durations.idle_sockets, 1000, durations.storm_sockets, users)
    return {"users": users, "rooms": rooms}


def versions():
    names = ["Django", "channels", "channels-redis", "daphne", "redis", "picows"]
    names += ["autobahn", "twisted", "txaio", "msgspec", "uvicorn", "uvloop"]
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def git_commit():
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
    except OSError:
        return None
    return done.stdout.strip() or None


def run_target(name, options, layout, database):
    if name == "chatsite":
        target = scenarios.Target(
            name="chatsite",
            asgi_app="chatsite.asgi:application",
            env=chatsite_env(database.url, fast_path=options.fast_path == "on"),
            keys=database.keys,
            postgres=database.vendor == "postgresql",
        )
    else:
        target = scenarios.Target(
            name="baseline",
            asgi_app="bench.baseline.asgi:application",
            env=baseline_env(database.workdir),
        )
    return {
        scenario: scenarios.run_scenario(scenario, target, options, layout)
        for scenario in options.scenarios
    }


def main(argv=None):
    options = parse_args(argv)
    layout = cpu_layout()
    server_cpus, client_cpus = layout
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)
    open_files = raise_open_files_limit()
    if options.compare:
        targets = ["chatsite", "baseline"]
    else:
        targets = ["baseline"] if options.baseline else ["chatsite"]
    database = Database(os.environ.get("DATABASE_URL"))
    results = {
        "meta": {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "commit": git_commit(),
            "quick": options.quick,
            "servers": options.servers,
            "server": options.server,
            "backlog": options.backlog,
            "fast_path": options.fast_path,
            "client_processes": options.clients,
            "database": database.vendor,
            "server_cpus": server_cpus,
            "client_cpus": client_cpus,
            "cpus": os.cpu_count(),
            "open_files_limit": open_files,
            "python": platform.python_version(),
            "versions": versions(),
            "latency": "send to receive, per delivered message, sender's echo included",
        },
        "targets": {},
    }
    try:
        if "chatsite" in targets:
            scenarios.log(f"database: {database.vendor}; migrating and seeding")
            database.create()
            database.keys = database.seed(seed_spec(options.durations))
        for name in targets:
            results["targets"][name] = run_target(name, options, layout, database)
    finally:
        database.drop()
        shutil.rmtree(database.workdir, ignore_errors=True)
    options.output.parent.mkdir(parents=True, exist_ok=True)
    options.output.write_text(json.dumps(results, indent=1) + "\n")
    print(report.table(results, options.scenarios))
    scenarios.log(f"results written to {options.output}")


if __name__ == "__main__":
    sys.exit(main())
