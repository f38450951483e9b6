"""The fake-GPU fault file (monitoring/fault_file.py) the daemon watches: lines apply once, in
order, when complete; bad lines are reported with their line number and field; a line for a node
not known yet waits for it."""
from __future__ import annotations

import logging

import pytest

from monitoring.fault_file import FaultFile, parse_fault_line
from monitoring.gpu import FakeGpuReader

NODE = "3f9a1c0d5e6b7a8c"


def test_lines_apply_once_in_order_and_a_partial_line_waits(tmp_path):
    readers = {NODE: FakeGpuReader(2, host="a")}
    path = tmp_path / "fake-faults.jsonl"
    faults = FaultFile(path)
    assert faults.apply(readers) == []  # no file yet
    path.write_text(f'{{"node": "{NODE[:6]}", "gpu": 1, "xid": 79}}\n{{"node": "{NODE}", "gpu": 0, "ecc_unc')
    assert [f.gpu for f in faults.apply(readers)] == [1]
    g0, g1 = readers[NODE].read()
    assert g1.xid_errors == 1 and g1.last_xid == 79 and not g1.healthy and g0.healthy
    with path.open("a") as f:
        f.write('orrected": 1}\n')
    assert [f.ecc_uncorrected for f in faults.apply(readers)] == [1]
    assert not readers[NODE].read()[0].healthy
    assert faults.apply(readers) == []  # nothing applies twice
    assert readers[NODE].read()[1].xid_errors == 1


def test_bad_lines_are_reported_with_line_and_field_and_skipped(tmp_path, caplog):
    readers = {NODE: FakeGpuReader(2, host="a")}
    path = tmp_path / "fake-faults.jsonl"
    path.write_text("\n".join([
        "not json",
        f'{{"node": "{NODE}", "gpu": 0}}',
        f'{{"node": "{NODE}", "gpu": 5, "xid": 79}}',
        f'{{"node": "{NODE}", "gpu": 0, "xid": 79, "at_s": 3}}',
        f'{{"node": "{NODE}", "gpu": 0, "xid": 48}}',
    ]) + "\n")
    with caplog.at_level(logging.WARNING, logger="shoal.faults"):
        applied = FaultFile(path).apply(readers)
    assert [f.xid for f in applied] == [48]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert f"{path}:1: fault not applied: not JSON" in errors[0]
    assert f"{path}:2: fault not applied:" in errors[1] and "a fault needs one of xid" in errors[1]
    assert f"{path}:3: fault not applied: gpu index 5 out of range" in errors[2]
    assert f"{path}:4: fault not applied: at_s: not used in a fault file" in errors[3]
    assert len(errors) == 4


def test_a_line_for_an_unknown_node_waits_until_it_appears(tmp_path, caplog):
    readers: dict = {}
    path = tmp_path / "fake-faults.jsonl"
    path.write_text(f'{{"node": "{NODE}", "gpu": 0, "xid": 79}}\n')
    faults = FaultFile(path)
    with caplog.at_level(logging.WARNING, logger="shoal.faults"):
        assert faults.apply(readers) == [] and faults.apply(readers) == []
    assert sum("is not a known node (yet)" in r.getMessage() for r in caplog.records) == 1  # logged once
    readers[NODE] = FakeGpuReader(1, host="a")
    assert len(faults.apply(readers)) == 1 and readers[NODE].read()[0].xid_errors == 1


@pytest.mark.parametrize("line, field", [('{"node": "n", "gpu": -1, "xid": 79}', "gpu"),
                                         ('{"node": "n", "gpu": 0, "xid": 79, "colour": 1}', "colour"),
                                         ('[1, 2]', "JSON object")])
def test_parse_names_the_field(line, field):
    with pytest.raises(ValueError, match=field):
        parse_fault_line(line)
