"""The policy must stay a pure function: nothing in scheduler/policy may import I/O, time,
randomness, Ray, the store or other Shoal layers."""
import ast
from pathlib import Path

import scheduler.policy as policy_pkg

FORBIDDEN = {"ray", "sqlalchemy", "fastapi", "httpx", "requests", "time", "datetime", "os", "random",
             "socket", "subprocess", "threading", "pynvml", "torch", "monitoring", "trainer"}
ALLOWED_SCHEDULER = "scheduler.policy"


def test_policy_imports_are_pure():
    root = Path(policy_pkg.__file__).parent
    bad = []
    for f in root.rglob("*.py"):
        for n in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in n.names] if isinstance(n, ast.Import) else (
                [n.module or ""] if isinstance(n, ast.ImportFrom) else [])
            for name in names:
                top = name.split(".")[0]
                if top in FORBIDDEN or (top == "scheduler" and not name.startswith(ALLOWED_SCHEDULER)):
                    bad.append(f"{f.name}: {name}")
    assert bad == [], f"impure imports in scheduler/policy: {bad}"
