"""Schemathesis fuzzes every operation of the served OpenAPI schema over real HTTP: no 5xx,
status codes, content types, headers and bodies as documented, schema-invalid input refused.

`test_fuzz_quick` (part of `make test`) runs a few cases per operation; `test_fuzz_full`
(marked slow; CI runs it in `make test-all`) runs >= 1,000 cases in all and asserts that count.
The streaming log endpoint is left out (with `follow` it stays open until its job ends); it is
tested directly in test_jobs.py."""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.api.conftest import REPO, ApiWorld

CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_headers_conformance,
    schemathesis.checks.response_schema_conformance,
    schemathesis.checks.negative_data_rejection,
]


@pytest.fixture(scope="module")
def fuzz_world(tmp_path_factory, tiny_model_dir):
    w = ApiWorld(tmp_path_factory.mktemp("fuzz"))
    for team in ("a", "b", "a"):  # some real jobs, so small ids in paths hit something
        w.job(team=team)
    w.service.tick()
    yield w
    w.close()


# The committed document (tests/api/test_openapi.py keeps it equal to the served one).
schema = schemathesis.openapi.from_path(str(REPO / "docs" / "openapi.json")).exclude(
    path="/v1/jobs/{job_id}/logs/stream")
CASES = {"quick": 0, "full": 0}


def _call(world, case, kind: str) -> None:
    """Calls as the cluster admin. Our Authorization header replaces the generated one, so when
    schemathesis made the headers invalid we cannot know whether what it broke is still sent:
    for those cases `negative_data_rejection` is not checked (every other check is)."""
    from schemathesis.core.parameters import ParameterLocation
    from schemathesis.generation import GenerationMode

    CASES[kind] += 1
    meta = getattr(case, "meta", None)
    header = meta.components.get(ParameterLocation.HEADER) if meta is not None else None
    checks = CHECKS
    if header is not None and header.mode == GenerationMode.NEGATIVE:
        checks = [c for c in CHECKS if c is not schemathesis.checks.negative_data_rejection]
    case.call_and_validate(base_url=world.url, headers={"Authorization": f"Bearer {world.tokens['root']}"},
                           checks=checks)


@schema.parametrize()
@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_fuzz_quick(case, fuzz_world):
    _call(fuzz_world, case, "quick")


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_fuzz_full(case, fuzz_world):
    _call(fuzz_world, case, "full")


@pytest.mark.slow
def test_fuzz_full_ran_at_least_1000_cases():
    """Runs after test_fuzz_full in the same session (file order)."""
    assert CASES["full"] >= 1000, CASES
