import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import sweep
import train_tiny as tt

ROOT = Path(__file__).resolve().parents[1]


def test_frontier_keeps_only_points_nothing_beats():
    xy = [(0.2, 0.9), (0.5, 0.8), (0.4, 0.5), (0.9, 0.3), (0.9, 0.2), (0.6, 0.85)]
    assert sweep.frontier(xy) == [(0.2, 0.9), (0.6, 0.85), (0.9, 0.3)]
    assert sweep.frontier([(0.5, 0.5)]) == [(0.5, 0.5)]


def test_kept_at_interpolates_on_the_frontier_and_says_when_out_of_reach():
    front = [(0.2, 0.9), (0.6, 0.85), (0.9, 0.3)]
    assert sweep.kept_at(front, 0.1) == 0.9  # a point further right already keeps 0.9
    assert sweep.kept_at(front, 0.6) == 0.85
    assert sweep.kept_at(front, 0.75) == pytest.approx(0.85 + (0.3 - 0.85) * 0.5)
    assert sweep.kept_at(front, 0.9) == pytest.approx(0.3)
    assert sweep.kept_at(front, 0.95) is None
    assert sweep.kept_at([], 0.5) is None


def fake_results(s, metrics):
    """metrics(label, lr, seed) -> dict, for every run of sweep s."""
    return {key: metrics(label, lr, seed) for label, lr, seed, key, _ in sweep.configs(s)}


def curve(*points):  # [(task acc, answer loss, knowledge)] -> a run's curve
    return [{"iter": 10 * i, "add_acc": a, "add_loss": loss, "fact_mc": k} for i, (a, loss, k) in enumerate(points)]


def test_summary_takes_each_seeds_envelope_over_configurations_and_steps():
    s = sweep.Sweep({"a x=1": dict(method="full"), "a x=2": dict(method="full", alpha=0.2), "b": dict(method="mofo")},
                    lrs=(1e-3, 2e-3), lr_for={}, seeds=(0, 1))
    runs = {  # (label, lr, seed) -> curve; "a x=2" lr 2e-3 seed 1 diverged
        ("a x=1", 1e-3, 0): curve((0.0, 2.0, 1.0), (0.6, 0.5, 0.9)),
        ("a x=1", 2e-3, 0): curve((0.0, 2.0, 1.0), (1.0, 0.1, 0.5)),
        ("a x=2", 1e-3, 0): curve((0.0, 2.0, 1.0), (0.3, 1.0, 0.95), (0.7, 0.4, 0.2)),
        ("a x=2", 2e-3, 0): curve((0.0, 2.0, 1.0), (0.5, 0.8, 0.1)),
        ("a x=1", 1e-3, 1): curve((0.0, 2.0, 1.0), (0.8, 0.3, 0.7)),
        ("a x=1", 2e-3, 1): curve((0.0, 2.0, 1.0), (1.0, 0.05, 0.3)),
        ("a x=2", 1e-3, 1): curve((0.0, 2.0, 1.0), (0.2, 1.5, 0.99)),
    }

    def metrics(label, lr, seed):
        if label == "b" or (label, lr, seed) not in runs:
            return {"diverged": "loss is nan"}
        return {"curve": runs[label, lr, seed]}

    rows = sweep.summary(s, fake_results(s, metrics), at=(0.9,))
    assert set(rows) == {"a"}  # "b" only diverged: no frontier
    a = rows["a"]
    assert (a["n_runs"], a["n_configs"], a["n_seeds"]) == (7, 4, 2)
    # seed 0's envelope over both configurations and every step: (0,1.0) (0.3,0.95) (0.6,0.9) (1.0,0.5)
    assert a["fronts"][0] == [(0.0, 1.0), (0.3, 0.95), (0.6, 0.9), (1.0, 0.5)]
    # at 90 %: seed 0 reads 0.9 + (0.5 - 0.9) * 0.75 = 0.6; seed 1: (0.8,0.7)-(1.0,0.3) gives 0.5
    (mean, std), n = a["at"][0.9]
    assert (mean, std, n) == (pytest.approx(0.55), pytest.approx(0.005 ** 0.5), 2)
    assert "(4 × 2 = 7)" in sweep.table(rows)
    mean, std = sweep.mean_front(a, [0.6, 0.9, 1.0])  # the drawn mean curve: the same reading per seed, then mean
    assert mean[:2] == pytest.approx([(0.9 + 0.99 + (0.7 - 0.99) * (0.6 - 0.2) / 0.6) / 2, 0.55])  # seed 1: (0.2,.99)-(0.8,.7)
    assert std[1] == pytest.approx(0.005 ** 0.5)
    assert mean[2] == pytest.approx(0.4)  # both seeds reach 100 %: 0.5 and 0.3
    assert math.isnan(sweep.mean_front(a, [1.01])[0][0])  # no seed gets there: nothing to draw
    # the answer-loss reading: right is lower loss; at a loss of 0.5, seed 0 keeps 0.9
    by_loss = sweep.summary(s, fake_results(s, metrics), at=(0.5,), x="loss")
    assert by_loss["a"]["fronts"][0][-1] == (-0.1, 0.5)
    # seed 0 keeps 0.9 at loss 0.5; seed 1 interpolates between (loss 1.5, 0.99) and (loss 0.3, 0.7)
    assert by_loss["a"]["at"][0.5][0][0] == pytest.approx((0.9 + 0.99 - 0.29 / 1.2) / 2)
    trans = sweep.transitions(s, fake_results(s, metrics))
    assert trans["a x=1"] == {1e-3: {0: 10, 1: 10}, 2e-3: {0: 10, 1: 10}}
    assert trans["a x=2"] == {1e-3: {0: 20, 1: None}, 2e-3: {0: 10}}  # seed 1 never got to 50 %; one diverged


def test_every_method_gets_the_same_number_of_configurations():
    s = sweep.SWEEPS["frontier"]
    runs = sweep.configs(s)
    assert len({key for *_, key, _ in runs}) == len(runs)  # every run its own key
    per_family = {}
    for label, lr, seed, *_ in runs:
        if seed == 0:
            per_family.setdefault(sweep.family(label), set()).add((label, lr))
    counts = {fam: len(c) for fam, c in per_family.items()}
    assert counts.pop("replay") == 1  # the reference line, not a competitor
    assert set(counts) == {"full", "mofo", "hft", "l1", "l2", "lora"}
    assert set(counts.values()) == {len(s.lrs) * 2} == {len(sweep.FULL_LRS)}  # 2 knob values x the rates
    assert [r[2] for r in runs] == sorted(r[2] for r in runs)  # seed by seed: a cut-short sweep has whole seeds
    lora = [cfg.lr for label, lr, _, _, cfg in runs if sweep.family(label) == "lora"]
    assert min(lora) == 4 * min(s.lrs)  # LoRA's grid is the others' times four
    longer = sweep.configs(replace(s, base={**s.base, "max_iters": 7}))
    assert not {key for *_, key, _ in runs} & {key for *_, key, _ in longer}  # the key follows the config


def test_scale_at_matched_tokens_pretrains_every_width_on_the_same_tokens():
    runs = {w: sweep.configs(sweep.SWEEPS[f"tokens{w}"]) for w in (64, 128, 192)}
    tokens = {w: {c.pretrain_max_iters * c.pretrain_batch_size * c.block_size for *_, c in r} for w, r in runs.items()}
    assert tokens[64] == tokens[128] == tokens[192] == {1200 * 32 * 128}
    assert [{c.n_embd for *_, c in r} for r in runs.values()] == [{64}, {128}, {192}]
    for w, r in runs.items():  # each method at its best rate on the rates sweep, with its step budget
        assert {(label, c.lr, c.max_iters) for label, _, _, _, c in r} == {
            ("full", 1e-4, sweep.RATE_STEPS), ("mofo alpha=0.1", 2e-4, sweep.RATE_STEPS)}, w
    assert {key for *_, key, _ in runs[128]} <= {key for *_, key, _ in sweep.configs(sweep.SWEEPS["rates"])}


def test_committed_results_keep_their_keys_and_compile_gets_its_own():
    for name in ("frontier", "scale64", "scale128", "scale192", "continual", "ablation", "alpha", "rates",
                 "rates_long", "continual_low", "tokens64", "tokens128", "tokens192"):  # every run in results/, today's keys
        committed = json.loads((ROOT / "results" / f"{name}.json").read_text())["runs"]
        assert set(committed) == {key for *_, key, _ in sweep.configs(sweep.SWEEPS[name])}, name
    s = sweep.SWEEPS["frontier"]
    assert {cfg.device for *_, cfg in sweep.configs(s)} == {"cpu"}  # on any machine: not under a GPU's autocast
    compiled = sweep.configs(replace(s, base={**s.base, "compile": True}))  # torch.compile rounds apart:
    assert not {key for *_, key, _ in compiled} & {key for *_, key, _ in sweep.configs(s)}  # never served eager


def test_committed_alpha_one_runs_are_full_fine_tuning_bit_for_bit():
    """MoFO at α = 1 is AdamW: in results/alpha.json its run equals full fine-tuning's, seed by seed,
    in every measured number (the curves included), all but the clock and the method's name."""
    runs = sweep.load("alpha", echo=lambda msg: None)
    by = {(label, seed): runs[key] for label, lr, seed, key, _ in sweep.configs(sweep.SWEEPS["alpha"])}
    for seed in sweep.SWEEPS["alpha"].seeds:
        mofo, full = by["mofo-α1", seed], by["full", seed]
        measured = [k for k in full if k not in sweep.NOT_COMPARED + ("method",)]
        assert len(measured) > 20 and "curve" in measured and "fact_mc_after" in measured
        assert {k: mofo[k] for k in measured} == {k: full[k] for k in measured}, seed
        assert mofo["method"] == "mofo" and mofo["config"]["alpha"] == 1.0 and full["method"] == "full"
    assert by["mofo-α0.5", 0]["curve"] != by["full", 0]["curve"]  # the comparison can tell runs apart


def test_smoke_sweep_runs_caches_and_resumes(tmp_path):
    s = replace(sweep.smoke(sweep.SWEEPS["frontier"]), methods={k: sweep.FRONTIER[k] for k in ("full", "mofo alpha=0.1")},
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
    assert sweep.restore(s, str(tmp_path / "clone"), echo=lambda msg: None, results_dir=tmp_path / "results") == 4
    served, computed = sweep.run_sweep(s, str(tmp_path / "clone"), workers=1, echo=lambda msg: None)
    assert computed == 0 and served == results
    saved = json.loads((tmp_path / "results" / "x.json").read_text())
    saved["runs"][k1]["fingerprint"] = {**saved["runs"][k1]["fingerprint"], "hft.py": "old"}
    (tmp_path / "results" / "x.json").write_text(json.dumps(saved))
    assert sweep.restore(s, str(tmp_path / "clone2"), echo=lambda msg: None, results_dir=tmp_path / "results") == 4
    assert sweep.run_sweep(s, str(tmp_path / "clone2"), workers=1, echo=lambda msg: None)[1] == 1  # the stale one


def test_revalidate_restamps_only_when_the_reruns_reproduce(tmp_path, monkeypatch):
    s = replace(sweep.smoke(sweep.SWEEPS["frontier"]), lrs=(2e-3,),
                methods={k: sweep.FRONTIER[k] for k in ("full", "hft hft_ratio=0.5")})
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


def test_a_comment_edit_keeps_every_run_and_a_code_edit_recomputes_them(tmp_path):
    """A reader's loop on a copy of the code: a comment or docstring edit in mofo.py serves every
    cached run; a new constant in it (code, even if unused) recomputes every run."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for f in ROOT.glob("*.py"):
        shutil.copy(f, repo / f.name)
    argv = [sys.executable, "sweep.py", "--preset", "smoke", "--sweep", "ablation", "--workers", "2",
            "--out_dir", str(tmp_path / "out")]

    def sweep_again():
        r = subprocess.run(argv, cwd=repo, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    assert "(4 computed)" in sweep_again()
    source = (repo / "mofo.py").read_text()
    (repo / "mofo.py").write_text(source.replace('"""', '"""A reader\'s note.\n', 1) + "# and a comment\n")
    assert "(0 computed)" in sweep_again()
    with open(repo / "mofo.py", "a") as f:
        f.write("READERS_CONSTANT = 1\n")
    second = sweep_again()
    assert "mofo.py changed since these results: recomputing 4 runs" in second
    assert "(4 computed)" in second


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


def test_cli_smoke_with_two_workers_prints_the_frontier_table(tmp_path, capsys):
    assert sweep.main(["--preset", "smoke", "--workers", "2", "--out_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    n = len(sweep.FRONTIER)  # one rate, one seed
    assert f"({n} computed)" in out
    for fam in {sweep.family(label) for label in sweep.FRONTIER}:
        assert f"| {fam} (" in out
    assert sweep.main(["--preset", "smoke", "--out_dir", str(tmp_path)]) == 0
    assert "(0 computed)" in capsys.readouterr().out


def test_bad_workers_is_one_clear_error(capsys):
    with pytest.raises(SystemExit) as e:
        sweep.main(["--workers", "0"])
    assert e.value.code != 0
    assert "--workers must be >= 1" in capsys.readouterr().err


def test_quick_preset_puts_your_method_beside_full_and_mofo():
    base = sweep.quick({})
    assert set(base.methods) == {"full", "mofo alpha=0.1"} and base.seeds == (0,) and base.lrs == sweep.LRS
    assert sweep.quick({"method": "full"}).methods == base.methods  # a baseline is not run twice
    yours = sweep.quick({"filter": "random"})
    assert yours.methods["yours mofo alpha=0.1 filter=random"] == {"method": "mofo", "filter": "random"}
    assert len({sweep.family(label) for label in yours.methods}) == 3  # a frontier of its own
    assert "lora rank=4" in sweep.quick({"method": "lora", "rank": 4}).methods
    # its runs are the frontier sweep's where they coincide: a cached frontier run is served
    keys = {r[3] for r in sweep.configs(sweep.SWEEPS["frontier"])}
    assert {r[3] for r in sweep.configs(base) if r[0] == "mofo alpha=0.1"} <= keys


def test_quick_preset_takes_train_tiny_flags_and_rejects_bad_ones(monkeypatch, tmp_path, capsys):
    got = {}
    monkeypatch.setattr(sweep, "quick_main", lambda s, args: got.setdefault("sweep", s) and 0)
    assert sweep.main(["--preset", "quick", "--method", "hft", "--hft_ratio", "0.25", "--out_dir", str(tmp_path)]) == 0
    assert got["sweep"].methods["hft hft_ratio=0.25"] == {"method": "hft", "hft_ratio": 0.25}
    for bad in (["--preset", "quick", "--method", "sgd"], ["--preset", "quick", "--no_such_flag", "1"], ["--alpha", "0.1"]):
        with pytest.raises(SystemExit):
            sweep.main(bad)


def test_quick_preset_prints_the_table_and_draws_the_figure(tmp_path, capsys):
    s = sweep.smoke(sweep.quick({"filter": "random"}))
    args = sweep.argparse.Namespace(out_dir=str(tmp_path), workers=1)
    assert sweep.quick_main(s, args) == 0
    text = capsys.readouterr().out
    assert "| yours (1 × 1 = 1)" in text and "| full (1 × 1 = 1)" in text and "| mofo (1 × 1 = 1)" in text
    assert (tmp_path / "quick.png").stat().st_size > 0


# ----------------------------------------------------------------------------------------------
# The study's verdicts
def test_interval_is_the_paired_t_interval_and_needs_two_seeds():
    mean, lo, hi, n = sweep.interval([0.01, 0.02, 0.03])
    half = 4.303 * 0.01 / math.sqrt(3)  # t(0.975, 2 dof) · sd / √n, sd = 0.01
    assert (mean, n) == (pytest.approx(0.02), 3) and (lo, hi) == (pytest.approx(0.02 - half), pytest.approx(0.02 + half))
    assert sweep.interval([0.05])[3] == 1 and math.isnan(sweep.interval([0.05])[1])
    assert sweep.interval([])[3] == 0
    assert sweep.facts_sd(0.9) == pytest.approx(0.01225, abs=1e-5)  # every fact: sd <= 1.5 points at 90 %


def point(it, val, test, facts, dist):
    return {"stage": 0, "iter": it, "add_val_acc": val, "add_acc": test, "fact_mc": facts, "dist_abs": dist}


def test_chosen_uses_validation_accuracy_never_the_test_problems_or_facts():
    c = [point(0, 0.0, 0.0, 0.98, 0.0), point(100, 0.5, 0.95, 0.97, 1.0),  # test acc high, validation not
         point(200, 0.85, 0.80, 0.60, 2.0), point(300, 0.95, 0.97, 0.90, 3.0)]  # facts higher later
    assert sweep.chosen(c, 0.8) is c[2]  # the first (nearest θ0) to reach 80 % on validation
    assert sweep.chosen(c, 0.9) is c[3] and sweep.chosen(c, 0.99) is None


def test_best_rate_leaves_the_scored_seed_out():
    p = lambda facts: point(0, 1.0, 1.0, facts, 1.0)
    by_lr = {1e-4: {0: p(0.50), 1: p(0.80), 2: p(0.80)},  # the others prefer 1e-4
             2e-4: {0: p(0.95), 1: p(0.70), 2: p(0.70)},  # seed 0 alone would pick 2e-4
             5e-4: {0: p(0.99), 1: None, 2: p(0.99)}}  # not reached by seed 1: never chosen for seed 0
    assert sweep.best_rate(by_lr, 0) == (by_lr[1e-4][0], 1e-4)
    assert sweep.best_rate(by_lr, 1)[1] == 5e-4  # seeds 0 and 2 both reach 5e-4 and keep the most there
    assert sweep.best_rate({1e-4: {0: p(0.5), 1: None}}, 0) == (None, None)


def test_matched_pairs_seeds_and_adds_the_pulled_back_families():
    s = sweep.Sweep({"full": dict(method="full", pullback=True), "mofo": dict(method="mofo")}, lrs=(1e-4, 2e-4),
                    lr_for={}, seeds=(0, 1, 2))
    def metrics(label, lr, seed):
        gain = 0.05 + 0.01 * seed if label == "mofo" else 0.0
        m = {"curve": [point(0, 0.0, 0.0, 0.98, 0.0), point(100, 0.9, 0.9, 0.5 + gain, 2.0)]}
        if label == "full":  # pulled halfway back it still reaches 90 % and keeps 0.7
            m["pullback"] = {"wise 0.5": point(100, 0.9, 0.9, 0.7, 1.0), "lines 0.5+0.5": point(100, 0.5, 0.5, 0.9, 1.5)}
        return m
    pts = sweep.matched(s, fake_results(s, metrics), 0.9)
    assert set(pts) == {"full", "mofo", "full + wise", "full + lines"}
    assert pts["full + wise"][1e-4][0]["fact_mc"] == 0.7 and pts["full + lines"][1e-4][0]["fact_mc"] == 0.5
    mean, lo, hi, n = sweep.at_rate(pts, "mofo", "full", 1e-4)
    assert n == 3 and mean == pytest.approx(0.06) and lo < 0.06 < hi
    assert sweep.over_axis(pts, "full + wise", "full")[:1] == (pytest.approx(0.2),)
    table = sweep.verdict_table(pts)
    assert "| mofo | +6.0 [" in table and "| full + wise | +20.0 [+20.0, +20.0] |" in table


def test_recovery_counts_the_steps_back_against_learning_from_the_pretrained_model():
    m = {"R": [[0.9]] * 5, "curve": [dict(point(i, 0, a, 0, 0), stage=st) for st, i, a in (
        (0, 0, 0.0), (0, 200, 0.3), (0, 400, 0.92), (4, 0, 0.0), (4, 200, 0.91))]}
    assert sweep.recovery(m) == (200, 400)


def test_the_main_command_lines_give_both_methods_at_their_own_best_rates():
    s = sweep.Sweep({"full": dict(method="full"), "mofo-α0.1": dict(method="mofo")}, lrs=(1e-4, 1e-3),
                    lr_for={}, seeds=(0, 1, 2))
    def metrics(label, lr, seed):  # full keeps most at 1e-4, MoFO at 1e-3; MoFO 2 points above full
        kept = {("full", 1e-4): 0.90, ("full", 1e-3): 0.20, ("mofo-α0.1", 1e-4): 0.50, ("mofo-α0.1", 1e-3): 0.92}
        return {"curve": [point(0, 0.0, 0.0, 0.97, 0.0), point(250, 0.95, 0.95, kept[label, lr] + seed / 1000, 1.0)]}
    line, = sweep.main_command_lines(s, fake_results(s, metrics))
    assert "(lr 0.0001 for full, 0.001 for MoFO α 0.1" in line and "3 seeds" in line
    assert "full fine-tuning keeps 90.1% of the facts and MoFO 92.1%" in line
    assert "a difference of +2.0 points [+2.0, +2.0]" in line


def test_the_rates_of_the_later_sweeps_are_the_axis_sweeps_choice():
    """AXIS_BEST (the recovery and width sweeps' rates) is what own_best_rates reads from the
    committed axis sweep at 90 % validation accuracy, over all its seeds."""
    s, runs = sweep.whole_seeds(sweep.SWEEPS["axis"], sweep.load("axis", echo=lambda msg: None))
    assert len(s.seeds) == 3
    best = sweep.own_best_rates(s, runs)
    assert {k: best[k] for k in sweep.AXIS_BEST} == sweep.AXIS_BEST
    for name in ("recovery", "width64", "width192"):
        rates = {(label, cfg.lr) for label, _, _, _, cfg in sweep.configs(sweep.SWEEPS[name])}
        assert ("full", best["full"]) in rates and ("mofo alpha=0.1", best["mofo-α0.1"]) in rates, name


def test_a_sweep_without_full_fine_tuning_gets_what_it_keeps():
    s = sweep.Sweep({"lora": dict(method="lora")}, lrs=(1e-4, 1e-3), lr_for={}, seeds=(0, 1))
    def metrics(label, lr, seed):  # only 1e-3 reaches 90 %; the seeds keep 50 and 60 % there
        return {"curve": [point(0, 0.0, 0.0, 0.97, 0.0), point(250, 0.95 if lr == 1e-3 else 0.5, 0.9, 0.5 + seed / 10, 1.0)]}
    text = sweep.study_tables(s, fake_results(s, metrics))
    assert "| lora | not reached | 55.0 [-8.5, 118.5] |" in text and "at 90% validation accuracy" in text
