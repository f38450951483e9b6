"""Fidelity: the same small workload on the real local Ray cluster (real server, real trainer on
fake GPUs) and in the simulator gives the same start order and JCTs within 10 %.

How real durations are made controllable: each job is the tiny demo model with a fixed
`max_steps`, so its run time is fixed by the work but not known in advance on a loaded CPU
machine (Ray Train start-up dominates). Pass 1 runs the jobs for real. Pass 2 replays Shoal's
own history from that server's store (`read_history`: submit time, GPU-time held / GPUs = each
job's run time including its start-up, GPUs, team, memory estimate) through the simulator with
the same cluster config, the same policy (`scheduler.policy.schedule`) and a tick every 0.5 s
(the server's interval). So only the scheduling (queueing, placement, order) is compared, which
is what the simulator claims to reproduce.
"""
import time

import pytest
import yaml

from scheduler.lifecycle import JobState
from scheduler.policy import schedule
from scheduler.sim.config import parse_sim_cluster
from scheduler.sim.engine import Simulation
from scheduler.sim.runner import prepare
from scheduler.sim.traces import read_history
from tests.integration.harness import ShoalServer, write_spec

pytestmark = [pytest.mark.slow, pytest.mark.ray]

GPUS = 4
# (gpus, max_steps): 12 jobs, 1-2 GPUs each, on 4 GPUs: a queue forms and drains.
JOBS = [(1, 20), (2, 40), (1, 60), (2, 20), (1, 40), (1, 20), (2, 60), (1, 40), (1, 20), (2, 40), (1, 60), (1, 20)]


def start_order(starts: dict[int, float]) -> list[int]:
    """Job ids by start time; jobs started in one service cycle (within 0.2 s) by id."""
    groups: list[list[tuple[int, float]]] = []
    for i, t in sorted(starts.items(), key=lambda kv: kv[1]):
        if groups and t - groups[-1][-1][1] < 0.2:
            groups[-1].append((i, t))
        else:
            groups.append([(i, t)])
    return [i for g in groups for i, _ in sorted(g)]


@pytest.mark.skip(reason="issue 4, open: never seen completing; over 9 min on the 2-core VM and not yet "
                  "checked against its 10 % bound")
def test_simulator_reproduces_a_real_run(tmp_path, tiny_model_dir):
    config = {"local": {"gpus": GPUS, "gpu_model": "H100 80GB", "reader": "fake"},
              "teams": {"default": {"gpus": GPUS}}, "scheduler": {"interval_s": 0.5}}
    server = ShoalServer(tmp_path / "home", config)
    client = server.up()
    try:
        ids = []
        for i, (gpus, steps) in enumerate(JOBS):
            spec = write_spec(tmp_path / f"j{i}.yaml", name=f"fid-{i}", **{
                "resources.gpus": gpus, "hyperparameters.max_steps": steps, "checkpoint_every_steps": steps})
            ids.append(client.submit_file(spec).id)
        deadline = time.time() + 1500
        while time.time() < deadline:
            jobs = [client.job(i) for i in ids]
            if all(j.state.terminal for j in jobs):
                break
            time.sleep(2)
        assert all(j.state is JobState.SUCCEEDED for j in jobs), [(j.id, j.state) for j in jobs]
    finally:
        server.down()

    url = f"sqlite:///{tmp_path / 'home' / 'shoal.db'}"
    trace = read_history(url)
    from scheduler.store import Store

    store = Store(url)
    real = {r.id: r for r in store.jobs()}
    real_start = {i: next(e.ts for e in store.events(i) if e.to_state == "ADMITTED") for i in ids}
    store.close()

    sim_cfg = {"gpu_models": {"H100 80GB": {"memory_gib": 80}},
               "nodes": [{"count": 1, "gpus_per_node": GPUS, "gpu_model": "H100 80GB", "cpus": GPUS}],
               "teams": {"default": {"gpus": GPUS}},
               "simulation": {"tick_s": 0.5, "restart_overhead_s": 0, "startup_s": 0, "stop_s": 0}}
    sc = parse_sim_cluster(yaml.safe_dump(sim_cfg), "<fidelity>")
    prep = prepare(trace, sc, None)
    r = Simulation(sc, prep.jobs, schedule, "shoal").run()
    # trace jobs are the history in submit order; the real job id is the trace line
    real_id = {j.index: tj.line for j, tj in zip(prep.jobs, trace.jobs)}
    sim = {real_id[row["index"]]: row for row in r.jobs}

    assert start_order({i: sim[i]["start_s"] for i in ids}) == start_order(real_start)
    for i in ids:
        real_jct = real[i].finished_at - real[i].submitted_at
        assert sim[i]["jct_s"] == pytest.approx(real_jct, rel=0.10), (i, sim[i], real_jct)
