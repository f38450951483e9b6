"""Trace readers: column mappings, ordering, and bad rows reported with file:line."""
from dataclasses import replace

import pytest

from scheduler.clock import FakeClock
from scheduler.lifecycle import JobState as S
from scheduler.sim.traces import TraceError, parse_columns, read_csv, read_history, read_philly, read_trace
from scheduler.sim.workload import WorkloadConfig, make_jobs
from scheduler.store import Store

HEADER = "timestamp,duration,num_gpus,gpu_time,cluster\n"


def write(tmp_path, text, name="t.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_philly_rows_sorted_by_submit_time_with_mapping(tmp_path):
    p = write(tmp_path, HEADER + "2017-10-09 07:01:55,66.0,1,66.0,11cb48\n"
                                 "2017-10-09 06:13:03,2951.0,2,5902.0,6214e9\n")
    tr = read_philly(p)
    assert [(j.line, j.gpus, j.duration_s, j.group, j.user) for j in tr.jobs] == [
        (3, 2, 2951.0, "6214e9", "6214e9"), (2, 1, 66.0, "11cb48", "11cb48")]
    assert tr.jobs[1].submit_s - tr.jobs[0].submit_s == 48 * 60 + 52
    assert tr.first(1).jobs == tr.jobs[:1]


def test_philly_bad_rows_name_file_line_and_column(tmp_path):
    p = write(tmp_path, HEADER + "2017-10-09 07:01:55,66.0,1,66.0,a\n"
                                 "yesterday,10,1,10,a\n"
                                 "2017-10-09 07:01:55,-5,1,-5,a\n"
                                 "2017-10-09 07:01:55,10,1.5,15,a\n"
                                 "2017-10-09 07:01:55,10,2,99,a\n"
                                 "2017-10-09 07:01:55,10,1,10,\n")
    with pytest.raises(TraceError) as e:
        read_philly(p)
    msgs = e.value.problems
    assert f"{p}:3: timestamp: 'yesterday' is neither seconds nor a date-time like 2017-10-09 07:01:55" in msgs
    assert f"{p}:4: duration: '-5' must be greater than 0" in msgs
    assert f"{p}:5: num_gpus: '1.5' is not a whole number" in msgs
    assert f"{p}:6: gpu_time: 99 is not duration x num_gpus (10 x 2 = 20)" in msgs
    assert f"{p}:7: cluster: missing value" in msgs
    assert "--skip-bad-rows" in msgs[-1]
    tr = read_philly(p, skip_bad=True)  # only with the explicit flag; the rows are listed
    assert [j.line for j in tr.jobs] == [2] and len(tr.skipped) == 5


def test_missing_columns_and_files(tmp_path):
    with pytest.raises(TraceError, match=r"t.csv:1: missing column\(s\) gpu_time, cluster"):
        read_philly(write(tmp_path, "timestamp,duration,num_gpus\n1,2,3\n"))
    with pytest.raises(TraceError, match="cannot read"):
        read_philly(tmp_path / "nope.csv")
    with pytest.raises(TraceError, match="no valid jobs"):
        read_philly(write(tmp_path, HEADER))


def test_generic_csv_with_user_mapping(tmp_path):
    p = write(tmp_path, "ts,run_s,n,vc,who\n100,50,4,research,ann\n40,10,1,prod,bob\n")
    tr = read_csv(p, parse_columns("submit=ts, duration=run_s, gpus=n, group=vc, user=who"))
    assert [(j.submit_s, j.duration_s, j.gpus, j.group, j.user, j.line) for j in tr.jobs] == [
        (40.0, 10.0, 1, "prod", "bob", 3), (100.0, 50.0, 4, "research", "ann", 2)]
    tr = read_trace(str(p), "auto", "submit=ts,duration=run_s,gpus=n")
    assert {j.group for j in tr.jobs} == {"default"}
    with pytest.raises(TraceError, match="map gpus to a column"):
        read_csv(p, {"submit": "ts", "duration": "run_s"})
    with pytest.raises(TraceError, match="unknown field"):
        read_csv(p, {"submit": "ts", "duration": "run_s", "gpus": "n", "queue": "vc"})
    with pytest.raises(TraceError, match="'submit' is not field=column"):
        parse_columns("submit")
    with pytest.raises(TraceError, match=r"t.csv:2: n: 'x' is not a number"):
        read_csv(write(tmp_path, "ts,run_s,n\n1,2,x\n"), {"submit": "ts", "duration": "run_s", "gpus": "n"})


def test_store_history_replays_succeeded_jobs(tmp_path):
    url = f"sqlite:///{tmp_path / 'shoal.db'}"
    store, clock = Store(url), FakeClock(1000.0)
    spec = {"name": "a", "resources": {"shareable": True, "expected_duration_s": 120}}
    done = store.submit(spec=spec, name="a", team="nlp", user="ann", priority=5, gpus=2,
                        memory_per_gpu_mib=9000, now=clock.now())
    store.transition(done.id, S.QUEUED, S.ADMITTED, reason="x", now=1010, attempt=1)
    store.transition(done.id, S.ADMITTED, S.STARTING, reason="x", now=1010)
    store.transition(done.id, S.STARTING, S.SUCCEEDED, reason="x", now=1110, attained_gpu_s=200.0)
    store.submit(spec=spec, name="b", team="nlp", user="bob", priority=0, gpus=1, memory_per_gpu_mib=1,
                 now=1200.0)  # still queued: not part of the history
    store.close()
    (job,) = read_history(url).jobs
    assert (job.submit_s, job.duration_s, job.gpus, job.group, job.user, job.memory_per_gpu_mib,
            job.shareable, job.priority, job.estimate_s) == (1000.0, 100.0, 2, "nlp", "ann", 9000, True, 5, 120.0)
    assert read_trace(url).jobs == [job]
    # the replay shows the policy the estimate the user gave (not a drawn one); oracles still see the truth
    (sim,) = make_jobs([job], WorkloadConfig(estimate_sigma=0.5), lambda tj: tj.group, seed=0)
    assert sim.spec_for(oracle=False)["resources"]["expected_duration_s"] == 120.0
    assert sim.spec_for(oracle=True)["resources"]["expected_duration_s"] == 100.0
    (none,) = make_jobs([replace(job, estimate_s=None)], WorkloadConfig(estimate_sigma=0.5), lambda tj: tj.group, 0)
    assert none.spec_for(oracle=False)["resources"]["expected_duration_s"] is None
