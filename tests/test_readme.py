"""The README's numbers are the committed results' numbers: a sample of them, recomputed from
results/*.json with the same functions the notebooks use, must appear in the page as printed."""
import json
import re
from pathlib import Path

import pytest

import report
import stats
import sweep

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text().replace("−", "-")  # the page's minus is the tables' hyphen


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
    table = stats.verdict_table(stats.matched(sweep.trained(s, runs), 0.9))
    for row in table.splitlines()[2:]:  # every method's row, its cells in order as the sweep prints them
        label, *cells = [c.strip() for c in row.strip("|").split("|")]
        if " + " not in label:  # the pull-backs: never at 90 %, said in words
            assert " | ".join(cells) + " |" in README, label


@pytest.mark.parametrize("a, b, lr", [("mofo-α0.1", "full", 5e-4), ("mofo-α0.1", "full", 1e-3)])
def test_the_lessons_differences_at_one_rate_are_the_studys(a, b, lr):
    s, runs = whole("axis")
    assert stats.cell(stats.at_rate(stats.matched(sweep.trained(s, runs), 0.9), a, b, lr)) in README


@pytest.mark.parametrize("a, b", [("mofo-α0.1", "full"), ("l2", "full"), ("l2", "mofo-α0.1"),
                                  ("replay 25%", "full"), ("hft", "full")])
def test_the_lessons_differences_at_own_best_rates_are_the_studys(a, b):
    s, runs = whole("axis")
    assert stats.cell(stats.over_axis(stats.matched(sweep.trained(s, runs), 0.9), a, b)) in README


def every_cell(name, accs=stats.MATCHED):
    """Every difference [interval] the sweep's tables can print: each pair of its methods, at each
    rate and over the rate axis, at each matched accuracy and at the end."""
    s, runs = whole(name)
    cells = set()
    for pts in [stats.matched(sweep.trained(s, runs), a) for a in accs] + [stats.ends(sweep.trained(s, runs))]:
        for a in pts:
            for b in pts:
                cells.add(stats.cell(stats.over_axis(pts, a, b)))
                cells.update(stats.cell(stats.at_rate(pts, a, b, lr)) for lr in pts[a])
    return cells


def lora_cells():
    """LoRA's differences from full fine-tuning: its sweep's runs beside the axis sweep's full ones."""
    (sa, ra), (sl, rl) = whole("axis"), whole("lora")
    cells = set()
    for acc in stats.MATCHED:
        pts = {"full": stats.matched(sweep.trained(sa, ra), acc)["full"], **stats.matched(sweep.trained(sl, rl), acc)}
        cells.add(stats.cell(stats.over_axis(pts, "lora", "full")))
        cells.update(stats.cell(stats.at_rate(pts, "lora", "full", lr)) for lr in pts["lora"])
    return cells


def width_cells():
    """MoFO − full fine-tuning per width, each at its own rate (notebook 04's one column)."""
    cells = set()
    for name in ("axis", "width64"):
        s, runs = whole(name)
        for pts in [stats.matched(sweep.trained(s, runs), a) for a in stats.MATCHED] + [stats.ends(sweep.trained(s, runs))]:
            mofo = "mofo-α0.1" if name == "axis" else "mofo alpha=0.1"
            own = {"full": {0: pts["full"][sweep.AXIS_BEST["full"]]},
                   "mofo": {0: pts[mofo][sweep.AXIS_BEST["mofo-α0.1"]]}}
            cells.add(stats.cell(stats.at_rate(own, "mofo", "full", 0)))
    return cells


def test_every_interval_on_the_page_is_one_the_study_computes():
    """No difference [interval] is typed in by hand: each is one the committed results give."""
    found = re.findall(r"[+-]\d+\.\d \[[+-]\d+\.\d, [+-]\d+\.\d\]", README)
    assert len(found) > 20
    known = every_cell("axis") | lora_cells() | every_cell("filters") | every_cell("alpha_low") | width_cells()
    assert [f for f in found if f not in known] == []


def test_the_facts_kept_quoted_are_the_studys():
    s, runs = whole("axis")
    pts = stats.matched(sweep.trained(s, runs), 0.9)
    for label, lr in (("full", 2e-4), ("full", 5e-4), ("full", 1e-3), ("mofo-α0.1", 5e-4), ("l2", 2e-4),
                      ("hft", 5e-4)):
        assert kept(pts[label][lr]) in README, (label, lr)


def test_the_main_commands_last_line_is_the_summarys():
    line = json.loads((ROOT / "results" / "summary.json").read_text())["main_command"][0]
    assert line == report.summary_lines()[0]
    assert "What it is not: " + line in README
