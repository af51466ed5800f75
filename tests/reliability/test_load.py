"""Load and soak: many concurrent connections on one reactor process, exchanging data.

The server is a reactor echo server in a process of its own (its fds are
limited to 20,000 here), the clients live in several worker processes,
each on its own 127.0.0.x source address. After warm-up the server's fd
count must not move and its RSS must stay flat; when the clients close,
fds, registrations and (io_uring) kernel-side poll requests go back to
where they started.

The short version runs by default; ``IOMUX_SOAK=1`` runs 19,000
connections for ``IOMUX_SOAK_SECONDS`` (default 180) per backend. A backend
that declares ``max_fd`` (select) runs at what fits below it, and says so.
"""

from __future__ import annotations

import time

from relsupport import SOAK, SOAK_SECONDS, HoldingClients, connection_budget, record, server_process

from iomux import Multiplexer

if SOAK:
    CONNECTIONS, WORKERS, DURATION, INTERVAL, WARMUP = 19_000, 4, SOAK_SECONDS, 5.0, 15.0
else:
    CONNECTIONS, WORKERS, DURATION, INTERVAL, WARMUP = 2_000, 2, 3.0, 1.0, 1.0
#: RSS may grow this much after warm-up (allocator noise), KiB.
RSS_SLACK_KIB = 6 * 1024 if SOAK else 4 * 1024


def test_many_connections_exchange_with_flat_fds_and_rss(driver: type[Multiplexer]) -> None:
    with server_process(driver.name) as server:
        base = server.stats()
        count, note = connection_budget(server, CONNECTIONS)
        if note:
            print(f"\n{note}")  # shown with -s; also in the figures summary
        clients = HoldingClients(
            server.port, count, workers=WORKERS, duration=DURATION, interval=INTERVAL
        )
        try:
            connected = clients.wait("connected", 180)
            assert sum(c["n"] for c in connected) == count, connected
            time.sleep(WARMUP)
            warm = server.stats()
            assert warm["live"] == count, warm
            samples = []
            end = time.monotonic() + DURATION - WARMUP
            while time.monotonic() < end:
                time.sleep(min(30.0, max(0.0, end - time.monotonic())))
                samples.append(server.stats())
            done = clients.wait("done", DURATION + 120)
            held = server.stats()
            clients.close()
        finally:
            clients.kill()
        after = server.wait_idle()

    exchanges = sum(d["exchanges"] for d in done)
    record(
        "load",
        driver.name,
        connections=count,
        limit=note or "none",
        seconds=DURATION,
        exchanges=exchanges,
        fds=f"{base['fds']}/{warm['fds']}/{held['fds']}/{after['fds']}",
        rss_kib=f"{base['rss_kib']}/{warm['rss_kib']}/{held['rss_kib']}/{after['rss_kib']}",
        py_objects=f"{warm['objects']}/{held['objects']}",
        registrations=f"{base['registrations']}/{held['registrations']}/{after['registrations']}",
        ring_polls=f"{base.get('ring_polls', '-')}/{after.get('ring_polls', '-')}",
        io=server.io,
        server_cpu_s=round(after["cpu"] - base["cpu"], 1),
    )
    assert all(d["errors"] == 0 and d["mismatches"] == 0 for d in done), done
    assert all(d["min_exchanges"] >= 1 for d in done), done
    nominal = count * (DURATION // INTERVAL)
    assert exchanges >= 0.5 * nominal, (exchanges, nominal)
    assert held["errors"] == 0 and after["errors"] == 0, after["first_errors"]
    assert held["refused_out_of_range"] == 0
    # Flat after warm-up: the same fds, and RSS within allocator noise.
    assert held["fds"] == warm["fds"] == base["fds"] + count, (base, warm, held)
    for st in [*samples, held]:
        assert st["rss_kib"] - warm["rss_kib"] <= RSS_SLACK_KIB, (warm, st)
        assert st["objects"] - warm["objects"] <= 100, (warm, st)
    # Everything released once the clients are gone.
    assert after["fds"] == base["fds"], (base, after)
    assert after["registrations"] == base["registrations"], (base, after)
    assert after.get("ring_polls") == base.get("ring_polls"), (base, after)
    assert after.get("slots") == base.get("slots"), (base, after)
    if "slots" in held:
        assert held["slots"] == base["slots"] + count, (base, held)
    assert after["lost_by"] == {"None": count}, after["lost_by"]
