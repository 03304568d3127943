"""The probe's report for Prefect's UI: a table of loads and a pass/fail and speed chart."""

from __future__ import annotations

from lmflow.probe import Attempt, ProbeReport, Trial, report_markdown


def test_report_has_the_load_table_and_the_chart() -> None:
    report = ProbeReport(key={"model": "m", "server": "s"}, declared_max=8192, granularity=1024,
                         loadable_max=4096, working_max=2048,
                         attempts=[Attempt(1024, "ok", 1024, 0.5), Attempt(8192, "clamped", 4096, 0.7)],
                         trials=[Trial(1024, "start", "1", "ok", 1000, 0.5),
                                 Trial(2048, "start", "1", "ok", 2000, 1.25),
                                 Trial(3072, "start", "1", "wrong", 3000, 2.0)])
    lines = report_markdown(report).splitlines()
    assert "| 8192 | clamped | 4096 | 0.70 |" in lines
    assert "   1024 pass ############################## 2000 tok/s" in lines
    assert "   2048 pass ########################       1600 tok/s" in lines
    assert "   3072 FAIL ######################         1500 tok/s" in lines
    assert "| 3072 | start | wrong | 3000 |  | 2.00 | 1500.0 |" in lines
