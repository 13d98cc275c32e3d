import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import stats
import sweep
import train_tiny as tt

ROOT = Path(__file__).resolve().parents[1]


def fake_results(s, metrics):
    """metrics(label, lr, seed) -> dict, for every run of sweep s."""
    return {key: metrics(label, lr, seed) for label, lr, seed, key, _ in sweep.configs(s)}


def test_every_method_gets_the_same_rates_and_the_grids_are_as_stated():
    runs = sweep.configs(sweep.SWEEPS["axis"])
    assert len({key for *_, key, _ in runs}) == len(runs)  # every run its own key
    rates = {}
    for label, lr, seed, _, cfg in runs:
        rates.setdefault(label, set()).add(cfg.lr)
        assert cfg.max_iters == sweep.STEPS and cfg.device == "cpu", label
    assert rates.pop("replay 25%") == {1e-4, 1e-3}  # the reference, not a competitor
    assert set(map(frozenset, rates.values())) == {frozenset(sweep.RATES)}  # equal tuning: the same 5 rates
    assert [r[2] for r in runs] == sorted(r[2] for r in runs)  # seed by seed: a cut-short sweep has whole seeds
    lora = sweep.configs(sweep.SWEEPS["lora"])
    assert {c.lr for *_, c in lora} == set(sweep.RATES) and {c.max_iters for *_, c in lora} == {2 * sweep.STEPS}
    filters = {(c.filter, c.alpha, c.lr) for *_, c in sweep.configs(sweep.SWEEPS["filters"])}
    assert len(filters) == 3 * 4 and {a for _, a, _ in filters} == {0.1}
    axis_keys = {key for *_, key, _ in runs}  # the momentum filter's and α's shared runs are the axis's
    momentum = {key for label, _, _, key, _ in sweep.configs(sweep.SWEEPS["filters"]) if label == "mofo-momentum"}
    assert momentum <= axis_keys and len(momentum) == 4 * 3
    longer = sweep.configs(replace(sweep.SWEEPS["axis"], base={**sweep.SWEEPS["axis"].base, "max_iters": 7}))
    assert not axis_keys & {key for *_, key, _ in longer}  # the key follows the config


def test_width_pretrains_every_width_on_the_same_tokens_at_the_axis_best_rates():
    runs = {w: sweep.configs(sweep.SWEEPS[f"width{w}"]) for w in (64, 128, 192)}
    tokens = {w: {c.pretrain_max_iters * c.pretrain_batch_size * c.block_size for *_, c in r} for w, r in runs.items()}
    assert tokens[64] == tokens[128] == tokens[192] == {1200 * 32 * 128}
    assert [{c.n_embd for *_, c in r} for r in runs.values()] == [{64}, {128}, {192}]
    for w, r in runs.items():  # each method at its best rate on the axis sweep
        assert {(label, c.lr, c.max_iters) for label, _, _, _, c in r} == {
            ("full", sweep.AXIS_BEST["full"], sweep.STEPS),
            ("mofo alpha=0.1", sweep.AXIS_BEST["mofo-α0.1"], sweep.STEPS)}, w
    assert {key for *_, key, _ in runs[128]} <= {key for *_, key, _ in sweep.configs(sweep.SWEEPS["axis"])}


def test_committed_results_keep_their_keys_and_compile_gets_its_own():
    for path in sorted((ROOT / "results").glob("*.json")):
        if path.stem in sweep.SWEEPS:  # every committed run is one the sweep still makes
            committed = json.loads(path.read_text())["runs"]
            assert set(committed) <= {key for *_, key, _ in sweep.configs(sweep.SWEEPS[path.stem])}, path.stem
    s = sweep.SWEEPS["axis"]
    compiled = sweep.configs(replace(s, base={**s.base, "compile": True}))  # torch.compile rounds apart:
    assert not {key for *_, key, _ in compiled} & {key for *_, key, _ in sweep.configs(s)}  # never served eager


def test_mofo_at_alpha_one_is_full_fine_tuning_bit_for_bit(tmp_path):
    """MoFO at α = 1 is AdamW: its run equals full fine-tuning's in every measured number (the
    curves included), all but the clock and the method's name."""
    s = replace(sweep.smoke(sweep.SWEEPS["alpha_low"]), methods={
        "mofo-α1": dict(method="mofo", alpha=1.0), "mofo-α0.5": dict(method="mofo", alpha=0.5),
        "full": dict(method="full")})
    runs = sweep.run_sweep(s, str(tmp_path), workers=1, echo=lambda msg: None)[0]
    by = {label: runs[key] for label, lr, seed, key, _ in sweep.configs(s, str(tmp_path))}
    measured = [k for k in by["full"] if k not in sweep.NOT_COMPARED + ("method",)]
    assert len(measured) > 20 and "curve" in measured and "fact_mc_after" in measured
    assert {k: by["mofo-α1"][k] for k in measured} == {k: by["full"][k] for k in measured}
    assert by["mofo-α0.5"]["curve"] != by["full"]["curve"]  # the comparison can tell runs apart


def test_smoke_sweep_runs_caches_and_resumes(tmp_path):
    s = replace(sweep.smoke(sweep.SWEEPS["axis"]), methods={k: sweep.AXIS[k] for k in ("full", "mofo-α0.1")},
                lrs=(1e-3, 2e-3))
    out = str(tmp_path)
    results, computed = sweep.run_sweep(s, out, workers=1, echo=lambda msg: None)
    runs = sweep.configs(s, out)
    assert computed == len(runs) == 4
    for *_, key, cfg in runs:
        m = results[key]
        assert m["config"]["lr"] == cfg.lr and m["config"]["seed"] == cfg.seed and m["method"] == cfg.method
        assert m["fingerprint"] == sweep.STAMP and len(m["curve"]) == cfg.curve_points + 1
        assert not os.path.exists(os.path.join(out, cfg.run_name + ".pt"))  # weights not kept, JSON is

    again, computed = sweep.run_sweep(s, out, workers=1, echo=lambda msg: None)
    assert computed == 0 and again == results
    done, finished = sweep.complete(replace(s, seeds=(0, 1)), out)  # seed 1 never ran: only seed 0 exports
    assert done.seeds == (0,) and finished == results

    # an interrupted sweep: one JSON missing, one half-written; only those two run again, identically
    (_, _, _, k1, c1), (_, _, _, k2, c2) = runs[0], runs[3]
    os.remove(os.path.join(out, c1.run_name + ".json"))
    path = os.path.join(out, c2.run_name + ".json")
    open(path, "w").write(open(path).read()[:50])
    resumed, computed = sweep.run_sweep(s, out, workers=1, echo=lambda msg: None)
    assert computed == 2
    for k in (k1, k2):
        assert resumed[k]["task_acc"] == results[k]["task_acc"] and resumed[k]["curve"] == results[k]["curve"]

    # a run stamped by other code is stale: recomputed, and the sweep says which file changed
    m = json.loads(open(path).read())
    open(path, "w").write(json.dumps({**m, "fingerprint": {**m["fingerprint"], "mofo.py": "0" * 12}}))
    said = []
    _, computed = sweep.run_sweep(s, out, workers=1, echo=said.append)
    assert computed == 1 and "mofo.py changed since these results: recomputing 1 runs" in said[0]

    # a fresh clone has no cache: the committed results fill it, and still only fresh runs are served
    results = sweep.run_sweep(s, out, workers=1, echo=lambda msg: None)[0]
    sweep.export("x", results, tmp_path / "results" / "x.json")
    assert sweep.fill_cache(s, str(tmp_path / "clone"), echo=lambda msg: None, results_dir=tmp_path / "results") == 4
    served, computed = sweep.run_sweep(s, str(tmp_path / "clone"), workers=1, echo=lambda msg: None)
    assert computed == 0 and served == results
    saved = json.loads((tmp_path / "results" / "x.json").read_text())
    saved["runs"][k1]["fingerprint"] = {**saved["runs"][k1]["fingerprint"], "hft.py": "old"}
    (tmp_path / "results" / "x.json").write_text(json.dumps(saved))
    assert sweep.fill_cache(s, str(tmp_path / "clone2"), echo=lambda msg: None, results_dir=tmp_path / "results") == 4
    assert sweep.run_sweep(s, str(tmp_path / "clone2"), workers=1, echo=lambda msg: None)[1] == 1  # the stale one


def test_revalidate_restamps_only_when_the_reruns_reproduce(tmp_path, monkeypatch):
    s = replace(sweep.smoke(sweep.SWEEPS["axis"]), lrs=(2e-3,),
                methods={k: sweep.AXIS[k] for k in ("full", "hft")})
    out = str(tmp_path)
    results, _ = sweep.run_sweep(s, out, workers=1, echo=lambda msg: None)
    runs = sweep.configs(s, out)

    def stamp_old():
        for *_, cfg in runs:
            p = os.path.join(out, cfg.run_name + ".json")
            m = json.loads(open(p).read())
            open(p, "w").write(json.dumps({**m, "fingerprint": {**sweep.STAMP, "hft.py": "old"}}))

    stamp_old()
    real = tt.run
    monkeypatch.setattr(tt, "run", lambda cfg: {**real(cfg), "task_acc": -1.0})  # "the change moved a number"
    said = []
    assert sweep.revalidate(s, out, workers=1, echo=said.append) is False
    assert any("differs in task_acc" in line for line in said)
    monkeypatch.setattr(tt, "run", real)
    assert sweep.run_sweep(s, out, workers=1, echo=lambda msg: None)[1] == 2  # still stale: recomputed

    stamp_old()
    said = []
    assert sweep.revalidate(s, out, workers=1, echo=said.append) is True
    assert said[-1] == "re-stamped 2 runs with the new fingerprint"
    again, computed = sweep.run_sweep(s, out, workers=1, echo=lambda msg: None)
    assert computed == 0 and all(again[k]["task_acc"] == results[k]["task_acc"] for k in results)

    stamp_old()  # family by family: HFT's numbers moved, full fine-tuning's did not
    monkeypatch.setattr(tt, "run", lambda cfg: {**real(cfg), **(
        {"task_acc": -1.0} if cfg.method == "hft" else {})})
    said = []
    assert sweep.revalidate(s, out, workers=1, echo=said.append) is False
    assert said[-1].startswith("re-stamped 1 runs with the new fingerprint; hft: the change moved")
    fresh = sweep.fresh(s, out)
    assert [k.split("_")[0] for k in fresh] == ["full"]


def test_a_comment_edit_keeps_every_run_and_a_code_edit_recomputes_them(tmp_path):
    """A reader's loop on a copy of the code: a comment or docstring edit in mofo.py serves every
    cached run; a new constant in it (code, even if unused) recomputes every run."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for f in ROOT.glob("*.py"):
        shutil.copy(f, repo / f.name)
    argv = [sys.executable, "sweep.py", "--preset", "smoke", "--sweep", "filters", "--workers", "2",
            "--out_dir", str(tmp_path / "out")]

    def sweep_again():
        r = subprocess.run(argv, cwd=repo, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    n = len(sweep.FILTERS)  # one smoke run per filter
    assert f"({n} computed)" in sweep_again()
    source = (repo / "mofo.py").read_text()
    (repo / "mofo.py").write_text(source.replace('"""', '"""A reader\'s note.\n', 1) + "# and a comment\n")
    assert "(0 computed)" in sweep_again()
    with open(repo / "mofo.py", "a") as f:
        f.write("READERS_CONSTANT = 1\n")
    second = sweep_again()
    assert f"mofo.py changed since these results: recomputing {n} runs" in second
    assert f"({n} computed)" in second


def test_export_and_load_say_when_the_code_changed(tmp_path):
    results = {"k": {"fingerprint": sweep.STAMP, "task_acc": 0.5}}
    path = sweep.export("x", results, tmp_path / "x.json")
    said = []
    assert sweep.load("x", path, echo=said.append) == results and not said
    saved = json.loads(path.read_text())
    saved["fingerprint"]["data.py"] = "old"
    path.write_text(json.dumps(saved))
    assert sweep.load("x", path, echo=said.append) == results
    assert said and said[0].startswith("WARNING: data.py changed since")
    with pytest.raises(ValueError, match="2 versions of the code"):
        sweep.export("x", {**results, "j": {"fingerprint": {"other": 1}}}, tmp_path / "y.json")


def test_cli_smoke_with_two_workers_prints_the_verdict_tables(tmp_path, capsys):
    assert sweep.main(["--preset", "smoke", "--workers", "2", "--out_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"({len(sweep.AXIS)} computed)" in out  # the axis sweep: one rate, one seed
    for label in sweep.AXIS:
        assert label == "full" or f"| {label} |" in out
    assert "at 90% validation accuracy" in out and "at the end of the runs" in out
    assert sweep.main(["--preset", "smoke", "--out_dir", str(tmp_path)]) == 0
    assert "(0 computed)" in capsys.readouterr().out
    assert sweep.main(["--preset", "smoke", "--sweep", "recovery", "--out_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out  # a continual sweep: its sequence and the steps back
    assert "| mofo alpha=0.1 | " in out and "steps back" in out


def test_bad_workers_is_one_clear_error(capsys):
    with pytest.raises(SystemExit) as e:
        sweep.main(["--workers", "0"])
    assert e.value.code != 0
    assert "--workers must be >= 1" in capsys.readouterr().err


def test_quick_preset_puts_your_method_beside_full_and_mofo():
    base = sweep.quick({})
    assert set(base.methods) == {"full", "mofo-α0.1"} and base.seeds == (0,) and set(base.lrs) <= set(sweep.RATES)
    assert sweep.quick({"method": "full"}).methods == base.methods  # a baseline is not run twice
    yours = sweep.quick({"filter": "random"})
    assert yours.methods["yours: mofo alpha=0.1 filter=random"] == {"method": "mofo", "filter": "random"}
    assert "yours: lora rank=4" in sweep.quick({"method": "lora", "rank": 4}).methods
    # the baselines' runs are the axis sweep's: served from results/axis.json, not computed again
    keys = {r[3] for r in sweep.configs(sweep.SWEEPS["axis"])}
    assert {r[3] for r in sweep.configs(base)} <= keys


def test_quick_preset_takes_train_tiny_flags_and_rejects_bad_ones(monkeypatch, tmp_path, capsys):
    got = {}
    monkeypatch.setattr(sweep, "quick_main", lambda s, args: got.setdefault("sweep", s) and 0)
    assert sweep.main(["--preset", "quick", "--method", "hft", "--hft_ratio", "0.25", "--out_dir", str(tmp_path)]) == 0
    assert got["sweep"].methods["yours: hft hft_ratio=0.25"] == {"method": "hft", "hft_ratio": 0.25}
    for bad in (["--preset", "quick", "--method", "sgd"], ["--preset", "quick", "--no_such_flag", "1"], ["--alpha", "0.1"]):
        with pytest.raises(SystemExit):
            sweep.main(bad)


def test_quick_preset_prints_the_table_and_draws_the_figure(tmp_path, capsys):
    s = sweep.smoke(sweep.quick({"filter": "random"}))
    args = sweep.argparse.Namespace(out_dir=str(tmp_path), workers=1)
    assert sweep.quick_main(s, args) == 0
    text = capsys.readouterr().out
    assert "| yours: mofo alpha=0.1 filter=random | " in text and "| mofo-α0.1 | " in text
    assert (tmp_path / "quick.png").stat().st_size > 0


# ----------------------------------------------------------------------------------------------
# The study's verdicts
def test_interval_is_the_paired_t_interval_and_needs_two_seeds():
    mean, lo, hi, n = stats.interval([0.01, 0.02, 0.03])
    half = 4.303 * 0.01 / math.sqrt(3)  # t(0.975, 2 dof) · sd / √n, sd = 0.01
    assert (mean, n) == (pytest.approx(0.02), 3) and (lo, hi) == (pytest.approx(0.02 - half), pytest.approx(0.02 + half))
    assert stats.interval([0.05])[3] == 1 and math.isnan(stats.interval([0.05])[1])
    assert stats.interval([])[3] == 0
    assert stats.facts_sd(0.9) == pytest.approx(0.01225, abs=1e-5)  # every fact: sd <= 1.5 points at 90 %
    assert stats.cell((0.1, 0.0, 0.2, 2), seeds=3) == "+10.0 [+0.0, +20.0] (2 of 3 seeds)"  # says who is missing
    assert stats.cell((0.1, 0.0, 0.2, 3), seeds=3) == "+10.0 [+0.0, +20.0]"


def point(it, val, test, facts, dist):
    return {"stage": 0, "iter": it, "add_val_acc": val, "add_acc": test, "fact_mc": facts, "dist_abs": dist}


def test_chosen_uses_validation_accuracy_never_the_test_problems_or_facts():
    c = [point(0, 0.0, 0.0, 0.98, 0.0), point(100, 0.5, 0.95, 0.97, 1.0),  # test acc high, validation not
         point(200, 0.85, 0.80, 0.60, 2.0), point(300, 0.95, 0.97, 0.90, 3.0)]  # facts higher later
    assert stats.chosen(c, 0.8) is c[2]  # the first to reach 80 % on validation
    assert stats.chosen(c, 0.9) is c[3] and stats.chosen(c, 0.99) is None


def test_the_reading_is_the_first_step_that_reaches_the_level_even_when_the_run_moves_back():
    # an L2 pull can bring θ back toward θ0 after the task is learned: one rule, the first step
    c = [point(0, 0.0, 0.0, 0.98, 0.0), point(250, 0.92, 0.9, 0.80, 4.0),
         point(500, 0.95, 0.95, 0.85, 3.5)]
    assert stats.chosen(c, 0.9) is c[1]


def test_a_best_rate_is_bracketed_or_says_what_stopped_it():
    p = lambda facts: point(0, 1.0, 1.0, facts, 1.0)
    by_lr = {1e-4: {0: None, 1: p(0.9)}, 2e-4: {0: p(0.8), 1: p(0.8)},
             5e-4: {0: p(0.85), 1: p(0.85)}, 1e-3: {0: p(0.5), 1: p(0.6)}, 2e-3: {0: p(0.9), 1: p(0.9)}}
    assert stats.bracket(by_lr, 2e-4) == "lowest rate reached"  # 1e-4 not reached by every seed
    assert stats.bracket(by_lr, 5e-4) == "bracketed"
    assert stats.bracket(by_lr, 1e-3) == "not the best"
    assert stats.bracket(by_lr, 2e-3) == "highest rate" and stats.bracket(by_lr, 1e-4) == "lowest rate"


def test_the_interpolated_reading_lies_between_the_two_scored_steps():
    c = [point(0, 0.0, 0.0, 0.98, 0.0), point(250, 0.8, 0.8, 0.90, 1.0), point(500, 1.0, 1.0, 0.70, 2.0)]
    assert stats.interpolated(c, 0.9) == pytest.approx(0.80)  # half way from 0.8 to 1.0
    assert stats.interpolated(c, 0.8) == pytest.approx(0.90) and stats.interpolated(c, 1.01) is None


def test_best_rate_leaves_the_scored_seed_out():
    p = lambda facts: point(0, 1.0, 1.0, facts, 1.0)
    by_lr = {1e-4: {0: p(0.50), 1: p(0.80), 2: p(0.80)},  # the others prefer 1e-4
             2e-4: {0: p(0.95), 1: p(0.70), 2: p(0.70)},  # seed 0 alone would pick 2e-4
             5e-4: {0: p(0.99), 1: None, 2: p(0.99)}}  # not reached by seed 1: never chosen for seed 0
    assert stats.best_rate(by_lr, 0) == (by_lr[1e-4][0], 1e-4)
    assert stats.best_rate(by_lr, 1)[1] == 5e-4  # seeds 0 and 2 both reach 5e-4 and keep the most there
    assert stats.best_rate({1e-4: {0: p(0.5), 1: None}}, 0) == (None, None)


def test_matched_pairs_seeds_and_adds_the_pulled_back_families():
    s = sweep.Sweep({"full": dict(method="full", pullback=True), "mofo": dict(method="mofo")}, lrs=(1e-4, 2e-4),
                    lr_for={}, seeds=(0, 1, 2))
    def metrics(label, lr, seed):
        gain = 0.05 + 0.01 * seed if label == "mofo" else 0.0
        m = {"curve": [point(0, 0.0, 0.0, 0.98, 0.0), point(100, 0.9, 0.9, 0.5 + gain, 2.0)]}
        if label == "full":  # pulled halfway back it still reaches 90 % and keeps 0.7
            m["pullback"] = {"wise 0.5": point(100, 0.9, 0.9, 0.7, 1.0), "lines 0.5+0.5": point(100, 0.5, 0.5, 0.9, 1.5)}
        return m
    pts = stats.matched(sweep.trained(s, fake_results(s, metrics)), 0.9)
    assert set(pts) == {"full", "mofo", "full + wise", "full + lines"}
    assert pts["full + wise"][1e-4][0]["fact_mc"] == 0.7 and pts["full + lines"][1e-4][0]["fact_mc"] == 0.5
    mean, lo, hi, n = stats.at_rate(pts, "mofo", "full", 1e-4)
    assert n == 3 and mean == pytest.approx(0.06) and lo < 0.06 < hi
    assert stats.over_axis(pts, "full + wise", "full")[:1] == (pytest.approx(0.2),)
    table = stats.verdict_table(pts)
    assert "| mofo | +6.0 [" in table and "| full + wise | +20.0 [+20.0, +20.0] |" in table


def test_recovery_counts_the_steps_back_against_learning_from_the_pretrained_model():
    m = {"R": [[0.9]] * 5, "curve": [dict(point(i, 0, a, 0, 0), stage=st) for st, i, a in (
        (0, 0, 0.0), (0, 200, 0.3), (0, 400, 0.92), (4, 0, 0.0), (4, 200, 0.91))]}
    assert stats.recovery(m) == (200, 400)


def test_the_main_command_lines_give_both_methods_at_their_own_best_rates():
    s = sweep.Sweep({"full": dict(method="full"), "mofo-α0.1": dict(method="mofo")}, lrs=(1e-4, 1e-3),
                    lr_for={}, seeds=(0, 1, 2))
    def metrics(label, lr, seed):  # full keeps most at 1e-4, MoFO at 1e-3; MoFO 2 points above full
        kept = {("full", 1e-4): 0.90, ("full", 1e-3): 0.20, ("mofo-α0.1", 1e-4): 0.50, ("mofo-α0.1", 1e-3): 0.92}
        return {"curve": [point(0, 0.0, 0.0, 0.97, 0.0), point(250, 0.95, 0.95, kept[label, lr] + seed / 1000, 1.0)]}
    line, = stats.main_command_lines(sweep.trained(s, fake_results(s, metrics)))
    assert "(lr 0.0001 for full, 0.001 for MoFO α 0.1" in line and "3 seeds" in line
    assert "full fine-tuning keeps 90.1% of the facts and MoFO 92.1%" in line
    assert "a difference of +2.0 points [+2.0, +2.0]" in line


def test_the_rates_of_the_later_sweeps_are_the_axis_sweeps_choice():
    """AXIS_BEST (the recovery and width sweeps' rates) is what own_best_rates reads from the
    committed axis sweep at 90 % validation accuracy, over all its seeds."""
    s, runs = sweep.whole_seeds(sweep.SWEEPS["axis"], sweep.load("axis", echo=lambda msg: None))
    assert len(s.seeds) == 3
    best = stats.own_best_rates(sweep.trained(s, runs))
    assert {k: best[k] for k in sweep.AXIS_BEST} == sweep.AXIS_BEST
    for name in ("recovery", "width64", "width192"):
        rates = {(label, cfg.lr) for label, _, _, _, cfg in sweep.configs(sweep.SWEEPS[name])}
        assert ("full", best["full"]) in rates and ("mofo alpha=0.1", best["mofo-α0.1"]) in rates, name


def test_a_sweep_without_full_fine_tuning_gets_what_it_keeps():
    s = sweep.Sweep({"lora": dict(method="lora")}, lrs=(1e-4, 1e-3), lr_for={}, seeds=(0, 1))
    def metrics(label, lr, seed):  # only 1e-3 reaches 90 %; the seeds keep 50 and 60 % there
        return {"curve": [point(0, 0.0, 0.0, 0.97, 0.0), point(250, 0.95 if lr == 1e-3 else 0.5, 0.9, 0.5 + seed / 10, 1.0)]}
    text = stats.study_tables(sweep.trained(s, fake_results(s, metrics)))
    assert "| lora | not reached | 55.0 [-8.5, 118.5] |" in text and "at 90% validation accuracy" in text
