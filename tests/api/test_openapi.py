"""The OpenAPI document committed in docs/openapi.json is the one the server serves."""
import json

from scheduler.api import offline_app, openapi_document
from tests.api.conftest import REPO


def test_committed_openapi_is_current():
    committed = (REPO / "docs" / "openapi.json").read_text()
    current = openapi_document(offline_app())
    assert committed == current, ("docs/openapi.json is stale: regenerate it with "
                                  "`.venv/bin/python -m scheduler.api > docs/openapi.json`")


def test_served_openapi_matches_and_documents_auth_and_problems(world):
    served = world.http(None).get("/openapi.json").json()
    committed = json.loads((REPO / "docs" / "openapi.json").read_text())
    assert served["paths"].keys() == committed["paths"].keys()
    assert served["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for path, ops in served["paths"].items():
        for method, op in ops.items():
            if path != "/healthz":
                assert "application/problem+json" in op["responses"]["401"]["content"], (method, path)
