"""The scheduling policy: a PURE function of a snapshot.

`schedule(snapshot) -> Decision` reads only its argument: no Ray, database, clock, environment or
randomness (tests/unit/test_policy_purity.py enforces the imports). The live service, the
simulator and property tests all call the same function.
"""
from scheduler.policy.types import (
    Cohort, Decision, GpuView, JobRequest, NodeView, Placement, PolicySettings, Preempt, RunningJob, Snapshot, Start,
    TeamQuota,
)
from scheduler.policy.shoal import forecast, never_fits, schedule

__all__ = [
    "Cohort", "Decision", "PolicySettings", "GpuView", "JobRequest", "NodeView", "Placement", "Preempt", "RunningJob", "Snapshot",
    "Start", "TeamQuota", "forecast", "never_fits", "schedule",
]
