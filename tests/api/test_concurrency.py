"""100 concurrent clients submit over HTTP with idempotency keys; some send their request twice
at the same moment (a racing retry) and some again after the answer (a retry after a lost
answer). No job may be lost and none duplicated."""
from __future__ import annotations

import threading
from collections import defaultdict

import httpx


def test_100_concurrent_clients_with_retries_lose_and_duplicate_nothing(world):
    spec = world.spec(team="a", **{"resources.gpus": 1})
    results: dict[str, list[tuple[int, int]]] = defaultdict(list)  # key -> [(status, job id)]
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(100)

    def post(client: httpx.Client, key: str) -> None:
        r = client.post("/v1/jobs", json={"spec": {**spec, "name": f"c-{key}"}}, headers={"Idempotency-Key": key})
        with lock:
            if r.status_code in (200, 201):
                results[key].append((r.status_code, r.json()["id"]))
            else:
                errors.append(f"{key}: {r.status_code} {r.text[:200]}")

    def client_main(i: int) -> None:
        key = f"key-{i}"
        with httpx.Client(base_url=world.url, timeout=120,
                          headers={"Authorization": f"Bearer {world.tokens['bob']}"}) as c:
            start.wait()
            if i % 3 == 0:  # a racing duplicate: the same request twice at once
                twin = threading.Thread(target=post, args=(c, key))
                twin.start()
                post(c, key)
                twin.join()
            else:
                post(c, key)
            if i % 5 == 0:  # a retry after the answer arrived (as if it had been lost)
                post(c, key)

    threads = [threading.Thread(target=client_main, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    assert len(results) == 100
    for key, answers in results.items():
        ids = {job_id for _, job_id in answers}
        assert len(ids) == 1, (key, answers)  # every answer for a key names one job
        assert sorted(s for s, _ in answers)[0] in (200, 201)
        assert [s for s, _ in answers].count(201) == 1, (key, answers)  # created exactly once
    jobs = world.store.jobs()
    assert len(jobs) == 100  # none lost, none duplicated
    assert sorted(j.id for j in jobs) == sorted(ids.pop() for ids in
                                                ({j for _, j in a} for a in results.values()))
    assert sorted(j.name for j in jobs) == sorted(f"c-key-{i}" for i in range(100))
