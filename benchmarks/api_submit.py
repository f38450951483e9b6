"""Sustained durable job submissions per second through the REST API over loopback HTTP.

The server is the real API + SQLite store + scheduler loop (tests/api/server.py: fake GPUs and
the in-memory executor instead of Ray, which is not on the submit path) in its own process.
Load comes from separate processes, each keeping `--conns` HTTP/1.1 keep-alive connections
busy with `POST /v1/jobs` (the example spec, a fresh Idempotency-Key each, as the SDK sends).
The load generator is a minimal hand-written HTTP client so that it costs the shared CPUs as
little as possible. A submission counts when its 201 arrived, i.e. after the server committed
it; at the end the store is counted and must hold exactly that many jobs.

    python benchmarks/api_submit.py [--seconds 15] [--procs 2] [--conns 16] [--postgres URL|'']

PostgreSQL first (a throw-away database on --postgres, default 127.0.0.1:5432 with trust auth),
then SQLite. Each prints the load average during its window (the machine is shared: a figure
taken while others load it is a floor) and the server's CPU time per submit (all its threads),
which depends much less on that load. Ends with `RESULT api_submits_per_s <v>` (SQLite).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _spec() -> dict:
    spec = yaml.safe_load((REPO / "examples" / "tiny-lora.yaml").read_text())
    base = REPO / "examples"
    spec["model"] = str(base / spec["model"])
    spec["dataset"] = {k: str(base / v) for k, v in spec["dataset"].items()}
    spec["team"] = "bench"
    return spec


async def _conn_loop(host: str, port: int, token: str, body: bytes, start_at: float, stop_at: float,
                     out: dict) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    head = (f"POST /v1/jobs HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n").encode()
    while (now := time.time()) < stop_at:
        req = head + f"Idempotency-Key: {uuid.uuid4()}\r\n\r\n".encode() + body
        t = time.perf_counter()
        writer.write(req)
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await reader.readexactly(length)
        dt = time.perf_counter() - t
        out["all_201"] += status == 201
        if status != 201:
            out["errors"] += 1
        elif now >= start_at:
            out["ok"] += 1
            out["lat"].append(dt)
    writer.close()


def _load_proc(url: str, token: str, conns: int, start_at: float, stop_at: float, q) -> None:
    u = urlparse(url)
    body = json.dumps({"spec": _spec(), "source": "bench.yaml"}).encode()
    out = {"ok": 0, "errors": 0, "all_201": 0, "lat": []}

    async def main():
        await asyncio.gather(*(_conn_loop(u.hostname, u.port, token, body, start_at, stop_at, out)
                               for _ in range(conns)))

    asyncio.run(main())
    t = os.times()
    out["cpu_s"] = t.user + t.system
    q.put(out)


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(seconds: float, warmup: float, procs: int, conns: int, db: str | None, scheduler: bool = True) -> dict:
    home = Path(tempfile.mkdtemp(prefix="shoal-bench-"))
    cfg = home / "cluster.yaml"
    cfg.write_text(yaml.safe_dump({"local": {"gpus": 8}, "teams": {"bench": {"gpus": 8}}}))
    args = [sys.executable, "-m", "tests.api.server", "--home", str(home / "home"), "--config", str(cfg)]
    if db:
        args += ["--db", db]
    if not scheduler:
        args.append("--no-scheduler")
    server = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        info = home / "home" / "daemon.json"
        deadline = time.monotonic() + 120
        while not info.exists():
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.1)
        url = json.loads(info.read_text())["url"]
        token = (home / "home" / "admin.token").read_text().strip()
        import httpx  # one submit first: the server's first admission imports the dataset reader

        r = httpx.post(f"{url}/v1/jobs", json={"spec": _spec()}, headers={"Authorization": f"Bearer {token}"},
                       timeout=300)
        assert r.status_code == 201, r.text
        start_at = time.time() + 1.0 + warmup
        stop_at = start_at + seconds
        q = mp.Queue()
        ps = [mp.Process(target=_load_proc, args=(url, token, conns, start_at, stop_at, q)) for _ in range(procs)]
        for p in ps:
            p.start()
        time.sleep(max(0.0, start_at - time.time()))
        cpu0, load0 = _cpu_s(server.pid), os.getloadavg()[0]
        time.sleep(max(0.0, stop_at - time.time()))
        cpu1, load1 = _cpu_s(server.pid), os.getloadavg()[0]
        results = [q.get() for _ in ps]
        for p in ps:
            p.join()
        ok = sum(r["ok"] for r in results)
        created = sum(r["all_201"] for r in results) + 1
        lat = sorted(x for r in results for x in r["lat"])
        from scheduler.store import Store

        store = Store(json.loads(info.read_text())["db"])
        stored = len(store.jobs())
        store.close()
        return {"submits_per_s": ok / seconds, "ok": ok, "errors": sum(r["errors"] for r in results),
                "server_cpu_ms": 1000 * (cpu1 - cpu0) / max(1, ok), "load": (load0, load1),
                "client_cpu_ms": 1000 * sum(r["cpu_s"] for r in results) / max(1, sum(r["all_201"] for r in results)),
                "created": created, "stored": stored,
                "p50_ms": 1000 * statistics.median(lat) if lat else float("nan"),
                "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan")}
    finally:
        server.terminate()
        server.wait(timeout=60)


def _postgres_db(admin_url: str):
    """Create a database `shoal_bench_<random>` on the server of `admin_url`; (its URL, a drop
    function), or (None, reason) when no server answers."""
    import secrets

    from sqlalchemy import create_engine, text

    name = f"shoal_bench_{secrets.token_hex(4)}"
    try:
        eng = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with eng.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as e:  # noqa: BLE001 - reported, the SQLite figure still counts
        return None, f"{type(e).__name__}: {str(e).splitlines()[0]}"

    def drop() -> None:
        with eng.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        eng.dispose()

    return admin_url.rsplit("/", 1)[0] + "/" + name, drop


def _report(label: str, a, r: dict) -> None:
    print(f"[{label}] scheduler loop {'off' if a.no_scheduler else 'on'}; {a.procs} x {a.conns} connections; "
          f"{a.seconds:.0f} s measured after {a.warmup:.0f} s warm-up; {os.cpu_count()} CPUs; load average "
          f"{r['load'][0]:.1f} at the start of the window, {r['load'][1]:.1f} at its end"
          + (" (others were using the machine: a figure under load is a floor)" if max(r["load"]) > 3 else ""))
    print(f"[{label}] submitted {r['ok']} in the window ({r['created']} in all), errors {r['errors']}, jobs in the "
          f"store {r['stored']} (must equal {r['created']})")
    print(f"[{label}] {r['submits_per_s']:.1f} submits/s; p50 {r['p50_ms']:.1f} ms  p99 {r['p99_ms']:.1f} ms; "
          f"server CPU {r['server_cpu_ms']:.2f} ms per submit (all its threads), load generators "
          f"{r['client_cpu_ms']:.2f} ms per request")
    assert r["stored"] == r["created"], "a submission answered 201 is missing from the store"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=15.0, help="measured window")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--procs", type=int, default=2, help="load-generating processes")
    ap.add_argument("--conns", type=int, default=16, help="connections per process")
    ap.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
                    help="a PostgreSQL server to measure too (a database shoal_bench_<random> is created on it "
                    "and dropped after); '' to skip")
    ap.add_argument("--no-scheduler", action="store_true", help="API alone: the scheduling loop does not run "
                    "(by default it runs, and plans over the growing queue, as in production)")
    a = ap.parse_args()
    if a.postgres:
        url, drop = _postgres_db(a.postgres)
        if url is None:
            print(f"[postgresql] not measured: {drop}")
        else:
            try:
                pg = run(a.seconds, a.warmup, a.procs, a.conns, url, not a.no_scheduler)
            finally:
                drop()
            _report("postgresql", a, pg)
            print(f"RESULT api_submits_per_s_postgres {pg['submits_per_s']:.1f}")
            print(f"RESULT api_submit_p50_ms_postgres {pg['p50_ms']:.2f}")
            print(f"RESULT api_submit_p99_ms_postgres {pg['p99_ms']:.2f}")
    r = run(a.seconds, a.warmup, a.procs, a.conns, None, not a.no_scheduler)
    _report("sqlite", a, r)
    print(f"RESULT api_submit_server_cpu_ms {r['server_cpu_ms']:.3f}")
    print(f"RESULT api_submit_p50_ms {r['p50_ms']:.2f}")
    print(f"RESULT api_submit_p99_ms {r['p99_ms']:.2f}")
    print(f"RESULT api_submits_per_s {r['submits_per_s']:.1f}")


if __name__ == "__main__":
    main()
