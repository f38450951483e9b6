import pytest

from scheduler.lifecycle import TERMINAL, TRANSITIONS, IllegalTransition, JobState, check_transition


def test_terminal_states_have_no_way_out():
    for s in TERMINAL:
        assert TRANSITIONS[s] == frozenset()
        for dst in JobState:
            with pytest.raises(IllegalTransition):
                check_transition(1, s, dst)


def test_every_state_reachable_from_queued():
    seen, todo = {JobState.QUEUED}, [JobState.QUEUED]
    while todo:
        for nxt in TRANSITIONS[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    assert seen == set(JobState)


def test_illegal_transition_names_the_allowed_ones():
    with pytest.raises(IllegalTransition, match=r"QUEUED -> RUNNING .*allowed from QUEUED: "):
        check_transition(7, JobState.QUEUED, JobState.RUNNING)
    check_transition(7, JobState.RUNNING, JobState.PREEMPTING)
    check_transition(7, JobState.PREEMPTING, JobState.QUEUED)
