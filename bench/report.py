"""The one table a run prints (markdown), from the results it writes as JSON."""

ROW_NAMES = {
    "fanout100": "fan-out, 100 receivers",
    "fanout1000": "fan-out, 1000 receivers",
    "rooms": "many rooms, 250 × 4, 1 msg/s each",
    "idle": "idle sockets",
    "persist": "persist, one busy room",
    "joinstorm": "join storm, one room",
    "reconnectstorm": "reconnect storm, SIGTERM one server",
}


def number(value, digits=0):
    if value is None:
        return "–"
    if isinstance(value, float) and digits:
        return f"{value:,.{digits}f}"
    return f"{value:,.0f}"


def ratio(ours, theirs, higher_is_better=True):
    """How many times better ours is; ("below", x) is a figure under x."""
    if isinstance(ours, tuple) or not ours or not theirs:
        return ""
    if isinstance(theirs, tuple):
        return f"> {ours / theirs[1]:.1f}×" if higher_is_better and theirs[1] else ""
    value = ours / theirs if higher_is_better else theirs / ours
    return f"{value:.1f}×"


HELD = "deliveries/s held (p99 < 100 ms, no loss)"


def fanout_rows(result):
    if result is None:
        return []
    best = result["best"]
    first = result["first_step"]
    failed = result.get("first_failure")
    limited = " (client-limited)" if result["client_limited"] else ""
    if best is not None:
        held = (
            HELD,
            best["deliveries_per_s"],
            number(best["deliveries_per_s"]) + limited,
        )
        at = best
        where = ""
    else:
        # Nothing held: the ratio is against the lowest rate offered.
        lowest = first and first["offered_msgs_per_s"] * result["receivers"]
        held = (HELD, ("below", lowest), f"none (< {number(lowest)})" + limited)
        at = first
        where = " (lowest step, failed)"
    rows = [held]
    if best is not None and best.get("server_us_per_delivery") is not None:
        target = result.get("target_us_per_delivery")
        rows[0] = (
            HELD,
            held[1],
            f"{held[2]} at {number(best['server_us_per_delivery'], 1)} µs server CPU "
            f"per delivery" + (f" (target ≤ {target:g})" if target else ""),
        )
    if at is not None:
        rows.append(
            (
                "p50 / p99 at that rate (ms)",
                at["p99_ms"] if best is not None else None,
                f"{at['p50_ms']} / {at['p99_ms']}{where}",
            )
        )
        rows.append(
            (
                "server CPU per delivery at that rate (µs)",
                at["server_us_per_delivery"] if best is not None else None,
                number(at["server_us_per_delivery"], 1) + where,
            )
        )
    if failed is not None:
        noisy = " (noisy)" if failed.get("noisy") else ""
        rows.append(
            (
                "first failing step: deliveries/s, p99 ms, lost",
                None,
                f"{number(failed['deliveries_per_s'])}, {failed['p99_ms']}, "
                f"{number(failed['lost'])} of {number(failed['expected_deliveries'])}"
                + noisy,
            )
        )
    return rows


def postgres_share(result):
    share = result.get("postgres_cpu_share")
    return "" if share is None else f", postgres {share:.0%}"


def rooms_rows(result):
    if result is None:
        return []
    limited = " (client-limited)" if result["client_limited"] else ""
    acked = number(result["acked"]) if result.get("acknowledged", True) else "no acks"
    return [
        ("msgs sent / acked", None, f"{number(result['sent'])} / {acked}"),
        (
            "deliveries: delivered / expected (lost)",
            None,
            f"{number(result['delivered'])} / {number(result['expected_deliveries'])} "
            f"({number(result['lost'])})",
        ),
        (
            "p50 / p99 latency (ms)",
            result["p99_ms"],
            f"{result['p50_ms']} / {result['p99_ms']}",
        ),
        (
            "server CPU per delivery (µs)",
            result["server_us_per_delivery"],
            number(result["server_us_per_delivery"], 1) + limited,
        ),
        (
            "server CPU, share of its core",
            None,
            f"{result['server_cpu_share']:.0%} "
            f"(+ redis {result['redis_cpu_share']:.0%}" + postgres_share(result) + ")",
        ),
    ]


def idle_rows(result):
    if result is None:
        return []
    return [
        (
            "server memory per socket (KiB)",
            result["kib_per_socket"],
            number(result["kib_per_socket"], 1),
        ),
        (
            "connects/s (handshake + join)",
            result["connects_per_s"],
            number(result["connects_per_s"]),
        ),
        (
            "server CPU per connect + join (ms)",
            result["connect"].get("server_ms_per_socket"),
            number(result["connect"].get("server_ms_per_socket"), 2),
        ),
    ]


def persist_rows(result):
    if result is None:
        return []
    if "skipped" in result:
        return [("acked msgs/s", None, "n/a")]
    return [
        ("acked msgs/s", result["acked_per_s"], number(result["acked_per_s"])),
        (
            "ack p50 / p99 (ms)",
            None,
            f"{result['ack_p50_ms']} / {result['ack_p99_ms']}",
        ),
        (
            "server CPU per acked msg (ms)",
            None,
            number(1e3 * result["server_cpu_share"] / result["acked_per_s"], 2)
            + f" ({result['server_cpu_share']:.0%} of its core"
            + postgres_share(result)
            + ")"
            if result["acked_per_s"]
            else "–",
        ),
    ]


def target(met):
    return "met" if met else "MISSED"


def joinstorm_rows(result):
    if result is None:
        return []
    if "skipped" in result:
        return [("sockets joined", None, "n/a")]
    failed = f", {number(result['failed'])} failed" if result["failed"] else ""
    idle = (
        f"{result['idle_after_s']} s (target ≤ {result['target_idle_s']:g} s: "
        f"{target(result['met_idle_target'])}); calming after the last joined "
        f"{result['calm_s']} s"
        if result["idle"]
        else f"not idle within {result['cpu_measured_for_s']} s"
    )
    return [
        (
            "connects/s (connect + hello + join + joined, whole storm)",
            result["connects_per_s"],
            f"{number(result['connects_per_s'])} ({number(result['connected'])} "
            f"sockets in {result['storm_s']} s{failed}; join p50 / p99 "
            f"{result['join_p50_ms']} / {result['join_p99_ms']} ms"
            + overflow_note(result)
            + ")",
        ),
        ("storm start until the servers are idle", None, idle),
        (
            "server CPU-s, storm start until idle",
            None,
            f"{result['server_cpu_s']} (target ≤ {result['target_server_cpu_s']:g}: "
            f"{target(result['met_cpu_target'])}); redis-server "
            f"{result['redis_cpu_s']}",
        ),
        (
            "presence frames delivered (names carried)",
            None,
            f"presence {number(result['presence'])} "
            f"({number(result['presence_names'])}), presence_batch "
            f"{number(result['presence_batch'])} "
            f"({number(result['presence_batch_names'])}); last one after "
            f"{result['last_presence_after_s']} s",
        ),
    ]


def overflow_note(result):
    """SYNs dropped on a full accept queue: the client retries them 1, 3, 7… s later."""
    dropped = result.get("listen_overflows")
    if not dropped:
        return ""
    backlog = result.get("backlog") or "the server's default"
    return f"; {number(dropped)} SYNs dropped on full accept queues, backlog {backlog}"


def reconnectstorm_rows(result):
    if result is None:
        return []
    if "skipped" in result:
        return [("seconds until every socket recovered", None, "n/a")]
    if result["all_recovered"]:
        back = (
            f"{result['reconnect_s']} s (target < {result['target_s']:g} s: "
            f"{target(result['met_target'])}); per socket p50 / p99 "
            f"{result['recover_p50_s']} / {result['recover_p99_s']} s"
        )
    else:
        back = (
            f"NOT ALL: {number(result['recovered_sockets'])} of "
            f"{number(result['on_killed_server'])}"
        )
    return [
        (
            "sockets, of them on the SIGTERMed server",
            None,
            f"{number(result['connected'])} of {number(result['sockets'])}, "
            f"{number(result['on_killed_server'])}; "
            f"{number(result['reconnect_attempts'])} reconnect attempts"
            + overflow_note(result)
            + exit_note(result),
        ),
        ("SIGTERM until every socket rejoined and recovered", None, back),
        (
            "acked msgs missed by a socket (target 0)",
            result["missed"],
            f"{number(result['missed'])} of {number(result['expected_deliveries'])}"
            f" ({number(result['acked'])} acked msgs, "
            f"{number(result['unacked'])} unacked at the end"
            + down_note(result)
            + f"); duplicates {number(result['duplicates'])}",
        ),
    ]


def exit_note(result):
    if result.get("killed_exited_after_s") is not None:
        return (
            f"; the SIGTERMed server exited after {result['killed_exited_after_s']} s"
        )
    if result.get("killed_alive_after_s") is not None:
        return (
            "; the SIGTERMed server was still running "
            f"{result['killed_alive_after_s']} s after the SIGTERM"
        )
    return ""


def down_note(result):
    notes = ""
    if result.get("missed"):
        notes += (
            f"; {number(result.get('missed_message_count'))} distinct msgs, "
            f"{number(result.get('missed_by_sockets_never_disconnected'))} of the "
            "misses at sockets that never disconnected"
        )
    down = result.get("sockets_down_at_the_end")
    if down:
        notes += (
            f"; {number(result['missed_by_sockets_down_at_the_end'])} of the missed "
            f"by the {number(down)} sockets not back at the end"
        )
    return notes


def health_rows(result):
    """Server errors and deaths, when there were any."""
    health = (result or {}).get("server_health") or {}
    during, teardown = health.get("errors", 0), health.get("teardown_errors", 0)
    if not (during or teardown or health.get("dead")):
        return []
    text = f"{during} while measuring, {teardown} when all sockets closed"
    if health.get("dead"):
        text += f"; dead: {', '.join(health['dead'])}"
    kinds = health.get("teardown_kinds") or health.get("kinds") or []
    if kinds:
        text += f" ({kinds[0]})"
    return [("server errors logged", None, text)]


ROWS = {
    "fanout100": fanout_rows,
    "fanout1000": fanout_rows,
    "rooms": rooms_rows,
    "idle": idle_rows,
    "persist": persist_rows,
    "joinstorm": joinstorm_rows,
    "reconnectstorm": reconnectstorm_rows,
}

# Whether a bigger value is better, by row, for the ratio column.
HIGHER_IS_BETTER = {
    "deliveries/s held (p99 < 100 ms, no loss)": True,
    "p50 / p99 at that rate (ms)": False,
    "p50 / p99 latency (ms)": False,
    "server CPU per delivery (µs)": False,
    "server CPU per delivery at that rate (µs)": False,
    "server memory per socket (KiB)": False,
    "connects/s (handshake + join)": True,
    "server CPU per connect + join (ms)": False,
    "acked msgs/s": True,
    "connects/s (connect + hello + join + joined, whole storm)": True,
}


def table(results, scenarios):
    """One markdown table: a column per target, and their ratio with both."""
    targets = list(results["targets"])
    compare = len(targets) == 2
    header = ["scenario", "figure", *targets]
    if compare:
        header.append("chatsite's advantage")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for scenario in scenarios:
        per_target = []
        for target in targets:
            result = results["targets"][target].get(scenario)
            rows = ROWS[scenario](result) + health_rows(result)
            per_target.append({name: (raw, text) for name, raw, text in rows})
        names = []
        for rows in per_target:
            names += [name for name in rows if name not in names]
        for name in names:
            cells = [rows.get(name, (None, ""))[1] or "" for rows in per_target]
            line = [ROW_NAMES[scenario], name, *cells]
            if compare:
                better = HIGHER_IS_BETTER.get(name)
                ours, theirs = (rows.get(name, (None, ""))[0] for rows in per_target)
                line.append("" if better is None else ratio(ours, theirs, better))
            lines.append("| " + " | ".join(line) + " |")
    lines.append("")
    if compare:
        lines.append(
            "chatsite's advantage: how many times better chatsite's figure is "
            "(below 1× it is worse)."
        )
    for target in targets:
        lines.append(f"{target}: {client_note(results['targets'][target])}.")
    if "chatsite" in targets:
        lines.append(f"chatsite: {serving_note(results['targets']['chatsite'])}.")
    return "\n".join(lines)


def serving_note(target_results):
    """What chatsite's servers said of chat.serving's fast path."""
    said = set()
    for result in target_results.values():
        said.update(((result or {}).get("server_health") or {}).get("serving", []))
    return "; ".join(sorted(said)) or "the servers logged no fast path line"


def steps_of(target_results):
    for scenario, result in target_results.items():
        if isinstance(result, dict):
            for step in result.get("steps") or [result]:
                yield scenario, step


def client_note(target_results):
    """Say whether the load generator was ever the limit, and how busy others were."""
    shares, limited, noisy = [], set(), 0
    for scenario, step in steps_of(target_results):
        if "client_cpu_share" in step:
            shares.append(step["client_cpu_share"])
            noisy += bool(step.get("noisy"))
        if step.get("client_limited"):
            limited.add(scenario)
    if not shares:
        return "no measured steps"
    note = f"client CPU peaked at {max(shares):.0%} of its core; "
    if limited:
        note += f"CLIENT-LIMITED in {', '.join(sorted(limited))}"
    else:
        note += "the client was never the limit"
    return note + (
        f"; {noisy} of {len(shares)} steps noisy (other processes used over "
        "10% of the server core)"
    )
