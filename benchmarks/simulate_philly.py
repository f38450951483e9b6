"""Philly trace replay through the real service loop (issue #4 targets).

Standard setting (defaults, no arguments):
  quality: the first 10,000 Philly jobs by submit time on 50 x 8 H100 (examples/sim/philly-50x8.yaml)
           under shoal, fifo, tiresias, srtf;
  speed:   the full 82,247-job trace on 60 x 8 (examples/sim/philly-60x8.yaml) under shoal.

Prints each policy's figures and ends with
  RESULT sim_philly_seconds <wall seconds of the full replay>
  RESULT sim_jct_vs_fifo <FIFO avg JCT / Shoal avg JCT>          (10k setting)
  RESULT sim_jct_vs_tiresias <Tiresias avg JCT / Shoal avg JCT>  (10k setting)
  RESULT sim_jct_vs_srtf <Shoal avg JCT / SRTF avg JCT>          (10k setting)
  RESULT sim_makespan_vs_bound <Shoal makespan / lower bound>    (10k setting)

Before the runs it times a fixed pure-Python round that uses no Shoal code (`machine reference`),
and after the full replay prints the replay's seconds over it: that ratio compares across
machines (VMs here differ by half in speed and drift within a session), the seconds only on one.

Options: --jobs N (quality setting size), --skip-full, --out DIR (writes the usual outputs).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scheduler.sim.config import load_sim_cluster  # noqa: E402
from scheduler.sim.metrics import summarize  # noqa: E402
from scheduler.sim.runner import prepare, run_policies, write_all  # noqa: E402
from scheduler.sim.traces import read_philly  # noqa: E402

TRACE = Path("/work/shared/traces/philly.csv")
if not TRACE.exists():
    TRACE = ROOT.parent / "shared" / "traces" / "philly.csv"


def fmt(s: dict, cpu_s: float | None = None, ticks: int | None = None) -> str:
    h = lambda v: "-" if v is None else f"{v / 3600:.2f} h"  # noqa: E731
    r = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    return (f"{s['policy']:<9} done {s['jobs_completed']:>6} rejected {s['jobs_rejected']:>4}  avg JCT {h(s['jct_avg_s'])}"
            f"  p50 {h(s['jct_p50_s'])}  p99 {h(s['jct_p99_s'])}  avg wait {h(s['queue_delay_avg_s'])}"
            f"  makespan/bound {r(s['makespan_vs_bound'])}  alloc(queue>0) {r(s['allocation_while_queue_nonempty'])}"
            f"  preemptions {s['preemptions']}  wall {s['sim_wall_s']:.1f} s  {s['sim_events_per_s']:.0f} simulated events/s"
            + (f"  CPU {cpu_s:.1f} s ({s['sim_events'] / cpu_s:.0f} events per CPU-s)" if cpu_s else "")
            + (f"  {ticks} service ticks" if ticks is not None else "")
            + (" (" + ", ".join(f"{k} {v}" for k, v in s["sim_ticks_by_cause"].items()) + ")"
               if s.get("sim_ticks_by_cause") else ""))


def machine_reference(rounds: int = 5) -> float:
    """CPU seconds of one round of a fixed pure-Python workload (dicts keyed by tuples, sorting,
    small objects, calls: what a cycle does), the least of `rounds`. It does not use Shoal's code, so
    it measures the machine only: the full replay's seconds over it compare across VMs, whose
    speed differs by half and drifts within a session (docs/simulator.md, sessions 13 and 14)."""
    import random

    class Item:
        __slots__ = ("key", "value")

        def __init__(self, key, value):
            self.key, self.value = key, value

    def bump(d: dict, k: tuple, i: int) -> None:
        d[k] = d.get(k, 0) + i

    best = float("inf")
    for _ in range(rounds):
        c0 = time.process_time()
        rng = random.Random(0)
        d: dict = {}
        for i in range(150_000):
            bump(d, (rng.randrange(4000), i % 97), i)
        items = sorted((Item(k, v) for k, v in d.items()), key=lambda it: (it.value % 1009, it.key))
        total = sum(it.value for it in items[::3])
        best = min(best, time.process_time() - c0)
        assert total > 0
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--policies", default="shoal,fifo,tiresias,srtf")
    ap.add_argument("--skip-full", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    ref = machine_reference()
    print(f"machine reference: {ref:.3f} CPU s (a fixed pure-Python round, the least of 5; no Shoal code)")
    t0 = time.perf_counter()
    trace = read_philly(TRACE)
    print(f"read {len(trace.jobs)} jobs from {TRACE} in {time.perf_counter() - t0:.1f} s")

    sc = load_sim_cluster(ROOT / "examples/sim/philly-50x8.yaml")
    prep = prepare(trace, sc, args.jobs)
    names = args.policies.split(",")
    by, results = {}, []
    print(f"\nquality setting: first {args.jobs} jobs on {sc.total_gpus} GPUs", flush=True)
    for name in names:  # one at a time, printed as each finishes
        c0 = time.process_time()
        (r,) = run_policies(prep, sc, [name])
        cpu = time.process_time() - c0
        results.append(r)
        s = summarize(r)
        by[r.policy] = s
        print(fmt(s, cpu, r.ticks), f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    if args.out:
        write_all(args.out / "quality", results, prep, sc, {"trace": str(TRACE), "jobs": args.jobs})

    full_s = None
    if not args.skip_full:
        sc60 = load_sim_cluster(ROOT / "examples/sim/philly-60x8.yaml")
        t1, c1 = time.perf_counter(), time.process_time()
        prep60 = prepare(trace, sc60, None)
        (full,) = run_policies(prep60, sc60, ["shoal"])
        full_s, full_cpu = time.perf_counter() - t1, time.process_time() - c1
        s = summarize(full)
        print(f"\nfull trace: {len(prep60.jobs)} jobs on {sc60.total_gpus} GPUs")
        print(fmt(s, full_cpu, full.ticks))
        print(f"full replay: {full_s:.1f} s wall, {full_cpu:.1f} s CPU (workload model + simulation), {full.ticks} service ticks, "
              f"{full.events} events, {full.events / full.wall_s:.0f} simulated events/s, "
              f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
        print(f"full replay / machine reference: {full_s / ref:.0f} (compare this across machines; the seconds "
              "compare only on one)")
        if args.out:
            write_all(args.out / "full", [full], prep60, sc60, {"trace": str(TRACE)}, plots=False)

    def ratio(a: str, b: str) -> float | None:
        x, y = by.get(a, {}).get("jct_avg_s"), by.get(b, {}).get("jct_avg_s")
        return x / y if x and y else None

    print()
    if full_s is not None:
        print(f"RESULT sim_philly_seconds {full_s:.1f}")
    for name, v in [("sim_jct_vs_fifo", ratio("fifo", "shoal")), ("sim_jct_vs_tiresias", ratio("tiresias", "shoal")),
                    ("sim_jct_vs_srtf", ratio("shoal", "srtf")),
                    ("sim_makespan_vs_bound", by.get("shoal", {}).get("makespan_vs_bound"))]:
        if v is not None:
            print(f"RESULT {name} {v:.3f}")


if __name__ == "__main__":
    main()
