"""Quota book-keeping: nominal GPUs per flavor, borrowing inside a cohort tree, lending limits.

Units are GPUs (floats: a shareable job on a shared GPU counts the fraction of the GPU's memory
it reserves, the same rule the usage ledger charges by).

Keys. A team with `nominal_by_flavor` accounts per flavor (key = the flavor's name; a flavor it
does not list has nominal 0). A team without it has one flavor-agnostic total (key "*"). Teams of
one cohort should use the same style: only equal keys pool.

Lending (Kueue's model). Of a team's nominal N on a key, `lending_limit` L may be lent
(None = all of it); the rest, N - L, is guaranteed to the team alone. Each cohort TREE (a cohort
and its ancestors/descendants, the root cohort naming the tree) pools every member's lendable part:

    capacity(tree, key) = sum over members of lendable(t)
    pool_used(tree, key) = sum over members of max(0, U_t + claim_t - guaranteed_t)

where U is what the team holds and claim_t = min(N_t - U_t, its waiting within-nominal demand):
a team with waiting work claims its idle nominal first, so it is not lent away under it. A job that
keeps the team within nominal always passes the quota check (if borrowers hold the GPUs, they are
reclaimed by preemption). A job that takes the team above nominal passes when the borrowed amount
stays within `borrowing_limit` (None = any) and the pool stays within capacity. A team without a
cohort never borrows or lends. Hierarchical cohorts pool over the whole tree: a cohort borrows
from its parent and its siblings; the tree's root bounds it all.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from scheduler.policy.types import Cohort, TeamQuota

ANY = "*"
EPS = 1e-9
NOMINAL, BORROW = "nominal", "borrow"


def cohort_roots(cohorts: tuple[Cohort, ...]) -> dict[str, str]:
    """cohort -> the root of its tree. A parent that is not declared is a root of its own;
    a cycle is a configuration bug and raises naming the cohorts."""
    parent = {c.name: c.parent for c in cohorts}
    roots: dict[str, str] = {}
    for name in parent:
        seen = [name]
        cur = name
        while parent.get(cur) is not None:
            cur = parent[cur]  # type: ignore[assignment]
            if cur in seen:
                raise ValueError(f"cohorts: parent cycle {' -> '.join(seen + [cur])}")
            seen.append(cur)
        roots[name] = cur
    return roots


@dataclass(frozen=True)
class Check:
    ok: bool
    kind: str = ""  # NOMINAL or BORROW when ok
    reason: str = ""  # why not, when not ok


_OK_NOMINAL, _OK_BORROW, _NO = Check(True, "nominal"), Check(True, "borrow"), Check(False)


def _fmt(x: float) -> str:
    return f"{x:.0f}" if abs(x - round(x)) < 1e-6 else f"{x:.2f}".rstrip("0")


class QuotaBook:
    def __init__(self, quotas: tuple[TeamQuota, ...], cohorts: tuple[Cohort, ...]):
        self.teams = {q.team: q for q in quotas}
        self._per_flavor = {q.team for q in quotas if q.nominal_by_flavor}
        self._nominal: dict[tuple[str, str], float] = {}
        self._guaranteed: dict[tuple[str, str], float] = {}
        roots = cohort_roots(cohorts)
        self.tree = {q.team: (roots.get(q.cohort, q.cohort) if q.cohort else None) for q in quotas}
        self.used: dict[tuple[str, str], float] = defaultdict(float)  # (team, key) -> GPUs held
        self.demand: dict[tuple[str, str], float] = defaultdict(float)  # waiting demand (claims)
        self._cap: dict[tuple[str, str], float] = defaultdict(float)  # (tree, key) -> lendable sum
        self._pool: dict[tuple[str, str], float] = defaultdict(float)  # (tree, key) -> pool_used
        self._keys_of_tree: dict[str, set[str]] = defaultdict(set)
        for q in quotas:
            tree = self.tree[q.team]
            if tree is not None:
                for key in self._nominal_keys(q):
                    self._keys_of_tree[tree].add(key)
        self._built = False
        self._lendable: dict[tuple[str, str], float] = {}

    # -- static facts ---------------------------------------------------------------------
    @staticmethod
    def _nominal_keys(q: TeamQuota) -> list[str]:
        return [f for f, _ in q.nominal_by_flavor] if q.nominal_by_flavor else [ANY]

    def key(self, team: str, flavor: str) -> str:
        return flavor if team in self._per_flavor else ANY

    def nominal(self, team: str, key: str) -> float:
        n = self._nominal.get((team, key))
        if n is None:
            q = self.teams[team]
            if not q.nominal_by_flavor:
                n = float(q.nominal_gpus) if key == ANY else 0.0
            else:
                n = float(dict(q.nominal_by_flavor).get(key, 0))
            self._nominal[(team, key)] = n
        return n

    def guaranteed(self, team: str, key: str) -> float:
        g = self._guaranteed.get((team, key))
        if g is None:
            n = self.nominal(team, key)
            lend = self.teams[team].lending_limit
            g = n if self.tree[team] is None else (0.0 if lend is None else max(0.0, n - lend))
            self._guaranteed[(team, key)] = g
        return g

    def max_gpus(self, team: str, key: str) -> float:
        """The most this team could ever hold on `key` (nominal + what it may borrow)."""
        q = self.teams[team]
        n = self.nominal(team, key)
        tree = self.tree[team]
        if tree is None:
            return n
        if (tree, key) not in self._lendable:
            self._lendable[(tree, key)] = sum(self.nominal(t, key) - self.guaranteed(t, key)
                                              for t, tr in self.tree.items() if tr == tree)
        room = self._lendable[(tree, key)] - (n - self.guaranteed(team, key))
        return n + (room if q.borrowing_limit is None else min(room, q.borrowing_limit))

    # -- state ----------------------------------------------------------------------------
    def hold(self, team: str, key: str, gpus: float) -> None:
        """Usage that exists before the cycle (running jobs)."""
        self.used[(team, key)] += gpus

    def want(self, team: str, key: str, gpus: float) -> None:
        """Waiting demand (before the pool is built): claims idle nominal first."""
        self.demand[(team, key)] += gpus

    def _term(self, team: str, key: str) -> float:
        """This team's draw on its tree's pool: max(0, U + claim - guaranteed), with
        claim = max(0, min(N - U, waiting demand))."""
        k = (team, key)
        u = self.used.get(k, 0.0)
        claim = self.nominal(team, key) - u
        d = self.demand.get(k, 0.0)
        if d < claim:
            claim = d
        if claim < 0.0:
            claim = 0.0
        t = u + claim - self.guaranteed(team, key)
        return t if t > 0.0 else 0.0

    def build(self) -> None:
        for team, tree in self.tree.items():
            if tree is None:
                continue
            for key in self._keys_of_tree[tree] | {k for (t, k) in self.used if t == team}:
                self._cap[(tree, key)] += self.nominal(team, key) - self.guaranteed(team, key)
                self._pool[(tree, key)] += self._term(team, key)
        self._built = True

    def lendable_now(self, team: str, key: str) -> float:
        tree = self.tree.get(team)
        return 0.0 if tree is None else max(0.0, self._cap[(tree, key)] - self._pool[(tree, key)])

    # -- the check ------------------------------------------------------------------------
    def check(self, team: str, key: str, gpus: float, label: str, explain: bool = True) -> Check:
        """May `team` take `gpus` more on `key`? With explain=False a refusal carries no reason
        (saves formatting for the many refusals nobody reads)."""
        assert self._built, "QuotaBook.build() first"
        q = self.teams.get(team)
        if q is None:
            return Check(False, reason=f"team {team} has no quota")
        used, n = self.used.get((team, key), 0.0), self.nominal(team, key)
        if used + gpus <= n + EPS:
            return _OK_NOMINAL
        tree = self.tree[team]
        q_borrow = q.borrowing_limit
        if not explain:
            over = used + gpus - n
            if tree is None or (q_borrow is not None and over > q_borrow + EPS):
                return _NO
            new = max(0.0, used + gpus - self.guaranteed(team, key))
            if self._pool[(tree, key)] - self._term(team, key) + new > self._cap[(tree, key)] + EPS:
                return _NO
            return _OK_BORROW
        have = f"team {team} uses {_fmt(used)}/{_fmt(n)} {label}, job needs {_fmt(gpus)}"
        if tree is None:
            return Check(False, reason=f"waiting for quota: {have}; no cohort to borrow from")
        over = used + gpus - n
        if q.borrowing_limit is not None and over > q.borrowing_limit + EPS:
            return Check(False, reason=f"waiting for quota: {have}; borrowing {_fmt(over)} would pass its "
                                       f"borrowing limit of {q.borrowing_limit}")
        old = self._term(team, key)
        new = max(0.0, used + gpus - self.guaranteed(team, key))  # no claim left above nominal
        if self._pool[(tree, key)] - old + new > self._cap[(tree, key)] + EPS:
            return Check(False, reason=f"waiting for quota: {have}; cohort {tree} has "
                                       f"{_fmt(self.lendable_now(team, key))} to lend")
        return Check(True, BORROW)

    def _change(self, team: str, key: str, used: float, demand: float) -> None:
        tree = self.tree.get(team)
        old = self._term(team, key) if tree is not None else 0.0
        self.used[(team, key)] += used
        if demand:
            self.demand[(team, key)] = max(0.0, self.demand[(team, key)] - demand)
        if tree is not None:
            self._pool[(tree, key)] += self._term(team, key) - old

    def commit(self, team: str, key: str, gpus: float, demand_key: str | None = None) -> None:
        """A start: the team holds `gpus` more on `key`, and the waiting demand it claimed on
        `demand_key` (default: the same key) is met."""
        if demand_key is None or demand_key == key:
            self._change(team, key, gpus, gpus)
        else:
            self._change(team, key, gpus, 0.0)
            self._change(team, demand_key, 0.0, gpus)

    def borrowing(self, team: str, key: str) -> float:
        """GPUs this team holds above its nominal on `key` (reclaimable by lenders)."""
        if team not in self.teams:
            return 0.0
        return max(0.0, self.used[(team, key)] - self.nominal(team, key))

    def same_tree(self, a: str, b: str) -> bool:
        return self.tree.get(a) is not None and self.tree.get(a) == self.tree.get(b)

    def over_budget(self, team: str) -> str | None:
        q = self.teams.get(team)
        if q is None or q.budget_usd is None or q.spent_usd < q.budget_usd:
            return None
        return f"team {team} spent ${q.spent_usd:,.2f} of its ${q.budget_usd:,.2f} budget this period"
