import json
import os
from dataclasses import replace

import pytest

import sweep


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


def test_summary_means_over_seeds_and_matches_each_seed_frontier():
    s = sweep.Sweep({"a": dict(method="full"), "b": dict(method="mofo")}, lrs=(1e-3, 2e-3), seeds=(0, 1))
    acc = {(1e-3, 0): 0.6, (1e-3, 1): 0.8, (2e-3, 0): 1.0, (2e-3, 1): 1.0}
    kept = {(1e-3, 0): 0.9, (1e-3, 1): 0.7, (2e-3, 0): 0.5, (2e-3, 1): 0.3}

    def metrics(label, lr, seed):
        if label == "b" and lr == 2e-3 and seed == 1:
            return {"diverged": "loss is nan"}
        return {"task_acc": acc[lr, seed], "fact_mc_after": kept[lr, seed]}

    rows = sweep.summary(s, fake_results(s, metrics), at=(0.9,))
    a = rows["a"]
    assert a["mean"] == [pytest.approx((0.7, 0.8)), pytest.approx((1.0, 0.4))]
    assert a["std"][1] == pytest.approx((0.0, 0.02 ** 0.5))  # sample std of 0.5 and 0.3
    # seed 0: frontier (0.6, 0.9)-(1.0, 0.5) gives 0.6 at 90 %; seed 1: (0.8, 0.7)-(1.0, 0.3) gives 0.5
    (mean, std), n = a["at"][0.9]
    assert (mean, std, n) == (pytest.approx(0.55), pytest.approx(0.005 ** 0.5), 2)
    b = rows["b"]  # the diverged run is left out: its lr has one seed, and seed 1 never reaches 90 %
    assert b["mean"][1] == pytest.approx((1.0, 0.5))
    assert b["at"][0.9] == (pytest.approx((0.6, 0.0)), 1)
    assert "(1/2 seeds)" in sweep.table(rows)


def test_every_run_has_its_own_key_and_the_key_follows_the_config():
    s = sweep.SWEEPS["frontier"]
    runs = sweep.configs(s)
    assert len(runs) == len(s.methods) * len(s.lrs) * len(s.seeds)
    assert len({key for *_, key, _ in runs}) == len(runs)
    longer = sweep.configs(replace(s, base={**s.base, "max_iters": s.base["max_iters"] + 1}))
    assert not {key for *_, key, _ in runs} & {key for *_, key, _ in longer}
    lora = [cfg.lr for label, lr, _, _, cfg in runs if label == "lora"]
    assert min(lora) == 4 * min(s.lrs)  # LoRA's grid is the others' times four


def test_smoke_sweep_runs_caches_and_resumes(tmp_path):
    s = replace(sweep.smoke(sweep.SWEEPS["frontier"]), methods={k: sweep.FRONTIER[k] for k in ("full", "mofo α=0.1")})
    out = str(tmp_path)
    results, computed = sweep.run_sweep(s, out, workers=1, echo=lambda msg: None)
    runs = sweep.configs(s, out)
    assert computed == len(runs) == 4
    for *_, key, cfg in runs:
        m = results[key]
        assert m["config"]["lr"] == cfg.lr and m["config"]["seed"] == cfg.seed and m["method"] == cfg.method
        assert 0 <= m["task_acc"] <= 1 and 0 <= m["fact_mc_after"] <= 1
        assert not os.path.exists(os.path.join(out, cfg.run_name + ".pt"))  # weights not kept, JSON is

    again, computed = sweep.run_sweep(s, out, workers=1, echo=lambda msg: None)
    assert computed == 0 and again == results

    # an interrupted sweep: one JSON missing, one half-written; only those two run again, identically
    (_, _, _, k1, c1), (_, _, _, k2, c2) = runs[0], runs[3]
    os.remove(os.path.join(out, c1.run_name + ".json"))
    path = os.path.join(out, c2.run_name + ".json")
    open(path, "w").write(open(path).read()[:50])
    resumed, computed = sweep.run_sweep(s, out, workers=1, echo=lambda msg: None)
    assert computed == 2
    for k in (k1, k2):
        assert resumed[k]["task_acc"] == results[k]["task_acc"]
        assert resumed[k]["dist_abs"] == results[k]["dist_abs"]


def test_cli_smoke_with_two_workers_prints_the_frontier_table(tmp_path, capsys):
    assert sweep.main(["--preset", "smoke", "--workers", "2", "--out_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "(20 computed)" in out
    for label in sweep.FRONTIER:
        assert f"| {label} |" in out
    assert sweep.main(["--preset", "smoke", "--out_dir", str(tmp_path)]) == 0
    assert "(0 computed)" in capsys.readouterr().out


def test_bad_workers_is_one_clear_error(capsys):
    with pytest.raises(SystemExit) as e:
        sweep.main(["--workers", "0"])
    assert e.value.code != 0
    assert "--workers must be >= 1" in capsys.readouterr().err
