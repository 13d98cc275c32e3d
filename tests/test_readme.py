"""The README's numbers are the committed results' numbers: a sample of them, recomputed from
results/*.json with the same functions the notebooks use, must appear in the page as printed."""
import json
import re
from pathlib import Path

import pytest

import report
import sweep

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def whole(name):
    return sweep.whole_seeds(sweep.SWEEPS[name], sweep.load(name, echo=lambda msg: None))


def kept(by_seed):  # "80.6 %": the mean facts kept over the seeds' points
    return f"{100 * sum(p['fact_mc'] for p in by_seed.values()) / len(by_seed):.1f} %"


def test_the_page_is_short_and_opens_with_the_lesson():
    assert len(README.encode()) <= 14 * 1024
    sections = re.findall(r"^## (.+)$", README, flags=re.M)
    assert sections[0] == "What the miniature shows" and sections[1] == "Run it"


def test_the_verdict_table_is_the_axis_sweeps():
    s, runs = whole("axis")
    assert len(s.seeds) == 3
    table = sweep.verdict_table(sweep.matched(s, runs, 0.9))
    for row in table.splitlines()[2:]:  # every method's row, as the sweep prints it
        label, *cells = [c.strip() for c in row.strip("|").split("|")]
        assert all(c in README for c in cells if c), label


@pytest.mark.parametrize("a, b, lr", [("mofo-α0.1", "full", 5e-4), ("mofo-α0.1", "full", 1e-3),
                                      ("l2", "full", 2e-4)])
def test_the_lessons_differences_are_the_studys(a, b, lr):
    s, runs = whole("axis")
    pts = sweep.matched(s, runs, 0.9)
    assert sweep.cell(sweep.at_rate(pts, a, b, lr)) in README
    assert sweep.cell(sweep.over_axis(pts, a, b)) in README


def test_the_facts_kept_per_rate_are_the_studys():
    s, runs = whole("axis")
    pts = sweep.matched(s, runs, 0.9)
    for lr in (2e-4, 1e-3):
        assert f"{kept(pts['full'][lr])}" in README, lr


def test_the_main_commands_last_line_is_the_summarys():
    line = json.loads((ROOT / "results" / "summary.json").read_text())["main_command"][0]
    assert line == report.summary_lines()[0]
    assert "What it is not: " + line in README
