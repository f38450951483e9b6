"""Tiny traces where every baseline's JCTs are worked out by hand, run through the real service
loop (store, snapshot, executor, preemption and requeue) by the simulator. No overheads
(startup, restart, stop all 0) so the arithmetic is exact."""
import pytest

from scheduler.sim.baselines import drf, fifo, make_tiresias, sjf, srtf, tiresias_queue
from tests.sim.conftest import cluster, jct_by_index, run, trace

# One GPU. A (t=0, 100 s), B (t=10, 30 s), C (t=20, 10 s); all 1 GPU, team x.
ABC = trace((0, 100, 1, "x"), (10, 30, 1, "x"), (20, 10, 1, "x"))


def test_fifo():
    """A 0-100 (JCT 100); B 100-130 (JCT 130-10=120); C 130-140 (JCT 140-20=120)."""
    r = run(cluster(), ABC, fifo)
    assert jct_by_index(r) == {0: 100, 1: 120, 2: 120}
    assert sum(j["preemptions"] for j in r.jobs) == 0


def test_sjf_oracle():
    """A alone at t=0 runs 0-100 (non-preemptive). At 100 the shorter C (10 s) goes first:
    C 100-110 (JCT 90), then B 110-140 (JCT 130)."""
    r = run(cluster(), ABC, sjf, oracle=True)
    assert jct_by_index(r) == {0: 100, 1: 130, 2: 90}


def test_srtf_oracle_preempts():
    """t=10: B (30) < A's remaining 90: A is preempted (checkpoint, requeue), B runs.
    t=20: C (10) < B's remaining 20: B is preempted, C runs 20-30 (JCT 10).
    t=30: B (remaining 20) before A (remaining 90): B 30-50 (JCT 40); A 50-140 (JCT 140).
    A's remaining 90 (not its total 100) is what the service reports after the requeue."""
    r = run(cluster(), ABC, srtf, oracle=True)
    assert jct_by_index(r) == {0: 140, 1: 40, 2: 10}
    assert {j["index"]: j["preemptions"] for j in r.jobs} == {0: 1, 1: 1, 2: 0}
    assert {j["index"]: j["attempts"] for j in r.jobs} == {0: 2, 1: 2, 2: 1}


def test_tiresias_two_queues():
    """Threshold 20 GPU-s (two queues). t=0 A runs (Q0). t=10 B arrives in Q0, A (attained 10) is
    still Q0 and running jobs keep their place: B waits. t=20: A reaches 20 -> Q1; C arrives;
    B (Q0) preempts A and runs 20-40. t=40: B reaches 20 -> Q1; C (Q0) preempts B, runs 40-50
    (JCT 30). t=50: A and B are both Q1 and pending; A was submitted first: A runs its remaining
    80 s 50-130 (JCT 130); B its remaining 10 s 130-140 (JCT 130).
    The t=40 demotion is no arrival or end: the simulator ticks then because Tiresias says when
    its next threshold crossing is (no periodic tick: tick_s is 1000 here)."""
    r = run(cluster(tick_s=1000), ABC, make_tiresias((20.0,)))
    assert jct_by_index(r) == {0: 130, 1: 130, 2: 30}


def test_tiresias_default_thresholds_keep_short_jobs_in_q0():
    """With the default 3600 GPU-s threshold all three stay in Q0: no preemption, FIFO order."""
    assert tiresias_queue(3599.0) == 0 and tiresias_queue(3600.0) == 1
    r = run(cluster(), ABC, make_tiresias())
    assert jct_by_index(r) == {0: 100, 1: 120, 2: 120}


def test_drf_serves_the_team_with_the_smallest_share():
    """Two GPUs. Team x: X1 (t=0, 100 s), X2 (t=1, 100 s), X3 (t=2, 50 s); team y: Y1 (t=3, 50 s).
    X1 and X2 start at once. t=100 X1 ends: x holds 1 of 2 GPUs (share 1/2), y holds 0: Y1 runs
    100-150 (JCT 147). t=101 X2 ends: X3 runs 101-151 (JCT 149).
    FIFO instead starts X3 at 100 (JCT 148) and Y1 at 101 (JCT 148)."""
    rows = trace((0, 100, 1, "x"), (1, 100, 1, "x"), (2, 50, 1, "x"), (3, 50, 1, "y"))
    assert jct_by_index(run(cluster(gpus=2), rows, drf)) == {0: 100, 1: 100, 2: 149, 3: 147}
    assert jct_by_index(run(cluster(gpus=2), rows, fifo)) == {0: 100, 1: 100, 2: 148, 3: 148}


def test_fifo_lets_a_fitting_job_pass_one_that_does_not_fit():
    """Two GPUs. A (t=0, 1 GPU, 100 s) runs; B (t=1, 2 GPUs, 10 s) cannot fit; C (t=2, 1 GPU,
    10 s) fits on the free GPU and runs 2-12 (YARN-CS offers free capacity to the next job).
    B starts at 100 when A ends: JCT 109."""
    rows = trace((0, 100, 1, "x"), (1, 10, 2, "x"), (2, 10, 1, "x"))
    assert jct_by_index(run(cluster(gpus=2), rows, fifo)) == {0: 100, 1: 109, 2: 10}


@pytest.mark.parametrize("restart", [0.0, 5.0])
def test_restart_overhead_delays_resumed_work(restart):
    """SRTF on ABC with a restart overhead r: A and B each resume once and pay r. C 20-30;
    B resumes at 30, works 20 s after r: ends 50+r (JCT 40+r); A resumes at 50+r, works 90 s
    after r: ends 140+2r (JCT 140+2r)."""
    r = run(cluster(restart_overhead_s=restart), ABC, srtf, oracle=True)
    assert jct_by_index(r) == {0: 140 + 2 * restart, 1: 40 + restart, 2: 10}


def test_interval_ticks_on_the_daemons_grid():
    """interval_s 60: the service ticks only at multiples of 60 s after the first arrival, as a
    daemon cycling every 60 s does; what happened in between is seen at the next one. FIFO on
    ABC: t=0 A starts. A's end (100) is seen at 120: B starts 120, ends 150, seen at 180: C
    starts 180, ends 190, seen (and recorded) at 240. JCTs A 120, B 180-10=170, C 240-20=220."""
    r = run(cluster(interval_s=60), ABC, fifo)
    assert jct_by_index(r) == {0: 120, 1: 170, 2: 220}
    assert {j["index"]: j["start_s"] for j in r.jobs} == {0: 0, 1: 120, 2: 180}
    # ticks: 0 (A arrives), 60 (B and C arrived at 10 and 20), 120, 180, 240 (ends)
    assert r.ticks == 5


def test_interval_sees_a_preempted_jobs_stop_at_the_next_cycle():
    """SRTF with interval_s 60. At 60 B and C (arrived at 10 and 20) are seen; C (10 s) is the
    shortest and A (40 s of work left) is preempted. The daemon sees A's stop at its next cycle,
    120 (no same-instant re-tick on a grid): C runs 120-130, seen at 180. A held its GPU until
    the cycle that saw it stop, so the service counts 120 GPU-s attained and reports 0 s left
    (production's ledger does the same): SRTF runs A first, 180-220 (its real 40 s), seen at
    240; B 240-270, seen at 300. JCTs: A 240, B 290, C 160."""
    r = run(cluster(interval_s=60), ABC, srtf, oracle=True)
    assert jct_by_index(r) == {0: 240, 1: 290, 2: 160}
    assert {j["index"]: j["preemptions"] for j in r.jobs} == {0: 1, 1: 0, 2: 0}
    assert r.ticks_by_cause["same_instant"] == 0
