"""Tests for train_tiny.py: the smoke pipeline end to end, bitwise resume, DDP and FSDP == one process,
a deterministic corpus, probes that score a perfect model 100 % and a random one at chance, and
one-line errors for bad input."""

import json
import math
import os
import subprocess
import sys
from contextlib import nullcontext
from dataclasses import dataclass, fields, replace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
import data
import loop
import pretrain
import report
import train_tiny as tt
from model import ModelConfig

SMOKE = tt.Config(**tt.PRESETS["smoke"])


def decode(ids):
    return "".join(data.VOCAB[i] for i in ids)


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    """A smoke out_dir with a pre-trained checkpoint, shared by the tests below."""
    out = tmp_path_factory.mktemp("smoke")
    metrics = tt.run(replace(SMOKE, out_dir=str(out), method="full", pullback=True))
    return out, metrics


def states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_smoke_pipeline(smoke_dir):
    out, metrics = smoke_dir
    corpus = data.build_corpus(SMOKE.data_seed, SMOKE.n_people, SMOKE.filler, SMOKE.corpus, SMOKE.arith)
    torch.manual_seed(0)
    fresh = tt.TinyLlama(tt.model_config(SMOKE))
    x, y = data.text_windows(corpus.train, SMOKE.block_size, 16, __import__("random").Random(0))
    initial = fresh(x, y)[1].item()
    assert abs(initial - math.log(len(data.VOCAB))) < 0.1  # an untrained model guesses uniformly
    assert metrics["heldout_loss_before"] < initial - 1.0  # pre-training lowered the loss
    on_disk = json.loads((out / "full.json").read_text())
    for key in ("task_acc", "task_acc_before", "R", "OP", "BWT", "fact_mc_before", "fact_mc_after",
                "fact_greedy_before", "fact_greedy_after", "fact_chance", "heldout_loss_before",
                "heldout_loss_after", "forget_mc", "forget_greedy", "heldout_loss_rise", "dist_abs",
                "dist_rel", "frac_changed", "time_s", "wall_s", "tokens_per_s", "peak_rss_mb", "pretrain_time_s",
                "curve", "pretrained_fingerprint", "machine"):
        assert key in on_disk, key
    assert on_disk["config"]["method"] == "full" and on_disk["dist_abs"] > 0
    assert 0 < on_disk["frac_changed"] <= 1 and on_disk["tokens_per_s"] > 0
    assert on_disk["fact_chance"] == pytest.approx((1 / 12 + 1 / 10 + 1 / 8 + 1 / 8) / 4)
    assert on_disk["pretrained_fingerprint"] == pretrain.pretrained_stamp(corpus)
    # the curves: step 0 is the pre-trained model, then every max_iters // curve_points steps, and the end
    every = SMOKE.max_iters // SMOKE.curve_points
    assert [p["iter"] for p in on_disk["curve"]] == list(range(0, SMOKE.max_iters, every)) + [SMOKE.max_iters]
    assert on_disk["curve"][0]["dist_abs"] == 0 and on_disk["curve"][-1]["dist_abs"] == pytest.approx(on_disk["dist_abs"])
    assert on_disk["curve"][-1]["add_loss"] < on_disk["curve"][0]["add_loss"]  # it learned something
    ckpt = torch.load(out / "full.pt", weights_only=True)
    assert {"model", "optimizer", "hft", "iter_num", "rng", "config"} <= ckpt.keys()
    assert not list(out.glob("*.tmp"))
    assert {"cpu", "capability", "cores", "threads", "torch"} <= on_disk["machine"].keys()


def test_every_curve_point_scores_every_fact_and_the_validation_problems(smoke_dir):
    _, m = smoke_dir
    end = m["curve"][-1]  # the same weights as the end point, which scores every fact
    assert end["fact_mc"] == m["fact_mc_after"] and end["add_acc"] == m["task_acc"]
    assert all({"add_acc", "add_loss", "add_val_acc", "add_val_loss"} <= p.keys() for p in m["curve"])
    n = SMOKE.eval_problems  # validation problems follow the test problems: the tests are unchanged
    corpus = data.build_corpus(SMOKE.data_seed, SMOKE.n_people, SMOKE.filler, SMOKE.corpus, SMOKE.arith)
    drawn = data.test_problems("add", SMOKE.data_seed, n + tt.VAL_PROBLEMS, corpus.stated)
    assert drawn[:n] == data.test_problems("add", SMOKE.data_seed, n, corpus.stated)
    assert len({prompt for prompt, _ in drawn}) == n + tt.VAL_PROBLEMS  # disjoint


def test_pullback_scores_the_end_weights_pulled_toward_theta0(smoke_dir):
    _, m = smoke_dir
    points = m["pullback"]
    assert list(points) == ["wise 0.25", "wise 0.5", "wise 0.75", "lines 0.25+0.75", "lines 0.5+0.5"]
    for lam in (0.25, 0.5, 0.75):  # one λ for every weight: the distance scales by λ
        assert points[f"wise {lam:g}"]["dist_abs"] == pytest.approx(lam * m["dist_abs"], rel=1e-5)
    for name in ("lines 0.25+0.75", "lines 0.5+0.5"):  # λ from a (first block) to 1 (last)
        a = float(name.split()[1].split("+")[0])
        assert a * m["dist_abs"] < points[name]["dist_abs"] < m["dist_abs"]
    assert all({"fact_mc", "add_acc", "add_val_acc", "heldout_loss"} <= p.keys() for p in points.values())


def test_lines_scales_each_block_by_its_depth():
    import pullback
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight",
             "model.layers.1.mlp.up_proj.weight", "model.layers.2.mlp.up_proj.weight",
             "model.norm.weight", "lm_head.weight"]
    theta0 = {n: torch.zeros(2) for n in names}
    theta = {n: torch.ones(2) for n in names}
    lam = {n: w[0].item() for n, w in pullback.pulled(theta0, theta, 3, 0.25, 0.75).items()}
    assert lam == {names[0]: 0.25, names[1]: 0.25, names[2]: 0.625, names[3]: 1.0,
                   names[4]: 1.0, names[5]: 1.0}
    assert all(w[0].item() == 0.5 for w in pullback.pulled(theta0, theta, 3, 0.5, 0.0).values())


def test_finetuning_loss_falls(smoke_dir):
    out, _ = smoke_dir
    cfg = replace(SMOKE, out_dir=str(out), method="full", run_name="long", max_iters=60, lr=3e-3)
    m = tt.run(cfg)
    ckpt = tt.read_checkpoint(str(out / "long.pt"))
    assert ckpt["iter_num"] == 0 and ckpt["task"] == 1
    model = tt.TinyLlama(tt.model_config(cfg))
    model.load_state_dict(ckpt["model"])
    problems = data.test_problems("add", cfg.data_seed, 40)
    x, y = data.make_rows([p for p, _ in problems], [a for _, a in problems])
    pre = tt.TinyLlama(tt.model_config(cfg))
    pre.load_state_dict(tt.read_checkpoint(pretrain.pretrained_path(cfg))["model"])
    assert model(x, y)[1].item() < pre(x, y)[1].item() - 1.0
    assert m["dist_rel"] > 0


class Crash(Exception):
    pass


@pytest.mark.parametrize("method,crash_at", [("mofo", 1), ("hft", 4), ("lora", 3)])
def test_resume_is_bitwise(smoke_dir, monkeypatch, method, crash_at):
    """Crash right after the crash_at-th checkpoint (mid-task or at a task boundary), resume, and
    end with exactly the weights and metrics of a run that was never stopped."""
    out, _ = smoke_dir
    cfg = replace(SMOKE, out_dir=str(out), method=method, tasks="add,reverse", max_iters=8,
                  ckpt_interval=3, filter="random", log_interval=0)
    whole = tt.run(replace(cfg, run_name=f"{method}_whole"))
    real, saves = loop.save_checkpoint, []

    def crashing(obj, path):
        real(obj, path)
        saves.append(path)
        if len(saves) == crash_at:
            raise Crash

    monkeypatch.setattr(loop, "save_checkpoint", crashing)
    with pytest.raises(Crash):
        tt.run(replace(cfg, run_name=f"{method}_cut"))
    monkeypatch.setattr(loop, "save_checkpoint", real)
    resumed = tt.run(replace(cfg, run_name=f"{method}_cut", resume=True))
    a = tt.read_checkpoint(str(out / f"{method}_whole.pt"))
    b = tt.read_checkpoint(str(out / f"{method}_cut.pt"))
    assert states_equal(a["model"], b["model"])
    assert a["hft"] == b["hft"] and (method != "hft" or a["hft"])
    for key in ("R", "fact_mc_after", "fact_greedy_after", "heldout_loss_after", "dist_abs", "curve"):
        assert whole[key] == resumed[key], key


DDP_SCRIPT = """
import sys; sys.path.insert(0, {root!r})
from dataclasses import replace
import data
import train_tiny as tt
for method in ("full", "mofo", "hft"):
    tt.run(replace(tt.Config(**tt.PRESETS["smoke"]), out_dir={out!r}, method=method,
                   run_name="ddp_" + method, max_iters=6, batch_size=8, log_interval=0))
"""


def torchrun_two(source, script):  # run `source` as 2 gloo ranks under torchrun, one thread each
    script.write_text(source)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_ddp_equals_one_process(smoke_dir, tmp_path):
    out, _ = smoke_dir
    torchrun_two(DDP_SCRIPT.format(root=str(ROOT), out=str(out)), tmp_path / "ddp.py")
    for method in ("full", "mofo", "hft"):
        tt.run(replace(SMOKE, out_dir=str(out), method=method, run_name="one_" + method, max_iters=6,
                       batch_size=8, log_interval=0))
        a = tt.read_checkpoint(str(out / f"ddp_{method}.pt"))["model"]
        b = tt.read_checkpoint(str(out / f"one_{method}.pt"))["model"]
        theta0 = tt.read_checkpoint(pretrain.pretrained_path(replace(SMOKE, out_dir=str(out))))["model"]
        assert not states_equal(b, theta0)  # it trained
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{method} {k}")


FSDP_SCRIPT = """
import sys; sys.path.insert(0, {root!r})
from dataclasses import replace
import train_tiny as tt
for name, fsdp, clip in (("fsdp", True, 1.0), ("fsdp_noclip", True, 0.0), ("ddp_noclip", False, 0.0)):
    tt.run(replace(tt.Config(**tt.PRESETS["smoke"]), out_dir={out!r}, method="full", fsdp=fsdp, grad_clip=clip,
                   run_name=name + "_full", max_iters=6, batch_size=8, log_interval=0))
"""


def test_fsdp_equals_ddp_and_one_process(smoke_dir, tmp_path):
    # AdamW on FSDP2-sharded weights (2 ranks; MoFO's sharded step is mofo_fast.MoFO's, tested in
    # tests/test_mofo_fsdp.py): bit for bit DDP's run without gradient clipping
    # (the same half-batch gradients, averaged alike); with clipping, the norm is summed shard by
    # shard, so the clip factor and the weights differ in the last bit. From one process, as DDP,
    # by the batch split's summation order (measured: <= 1.2e-7 over 20 smoke iterations).
    out, _ = smoke_dir
    torchrun_two(FSDP_SCRIPT.format(root=str(ROOT), out=str(out)), tmp_path / "fsdp.py")
    read = lambda name: tt.read_checkpoint(str(out / f"{name}.pt"))["model"]
    assert states_equal(read("fsdp_noclip_full"), read("ddp_noclip_full"))
    tt.run(replace(SMOKE, out_dir=str(out), method="full", run_name="one_full_fsdp", max_iters=6, batch_size=8,
                   log_interval=0))
    a, b = read("fsdp_full"), read("one_full_fsdp")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"fsdp {k}")
    metrics = [json.loads((out / f"{name}.json").read_text()) for name in ("fsdp_full", "one_full_fsdp")]
    assert metrics[0]["heldout_loss_after"] == pytest.approx(metrics[1]["heldout_loss_after"], rel=1e-4)


def test_corpus_is_deterministic():
    build = data.build_corpus.__wrapped__  # bypass the cache: really build it twice
    a, b, c = build(0, 20, 0.1), build(0, 20, 0.1), build(1, 20, 0.1)
    assert torch.equal(a.train, b.train) and torch.equal(a.heldout, b.heldout) and a.probes == b.probes
    assert not torch.equal(a.train, c.train) and a.probes != c.probes
    assert len(a.probes) == 4 * 20
    text = decode(a.train.tolist())
    for attr, prompt, value in a.probes:  # every probed fact is stated in pre-training text
        assert f"{prompt[1:]} {value}." in text
    held = set(decode(a.heldout.tolist()).split("\n")[1:])
    assert held and not held & set(text.split("\n"))  # held-out sentences never seen
    for task in data.TASKS:
        problems = data.test_problems.__wrapped__(task, 0, 50)
        assert problems == data.test_problems.__wrapped__(task, 0, 50)
        assert len({p for p, _ in problems}) == 50


class Oracle(torch.nn.Module):
    """A fake model that knows the right continuation of every given string: logits put all mass
    on the true next character after a known prefix, and are uniform anywhere else."""

    def __init__(self, texts):
        super().__init__()
        self.next = {text[:i]: text[i] for text in texts for i in range(1, len(text))}

    def forward(self, idx, targets=None):
        logits = torch.zeros(*idx.shape, len(data.VOCAB))
        where = [(b, t, data.STOI[self.next[s[:t + 1]]]) for b, s in enumerate(map(decode, idx.tolist()))
                 for t in range(len(s)) if s[:t + 1] in self.next]
        logits[tuple(torch.tensor(where).T)] = 50.0
        return logits, None


def test_probes_score_perfect_model_100_and_random_model_at_chance():
    corpus = data.build_corpus(0, 100, 0.1)
    oracle = Oracle([p + f" {v}." for _, p, v in corpus.probes])
    scores = tt.fact_scores(oracle, corpus.probes)
    assert scores["fact_mc"] == 1.0 and scores["fact_greedy"] == 1.0
    problems = data.test_problems("add", 0, 100)
    acc, loss = tt.task_scores(Oracle([p + a for p, a in problems]), problems)
    assert acc == 1.0 and loss < 1e-6
    torch.manual_seed(0)
    random_model = tt.TinyLlama(ModelConfig(2, 2, 32, 64, len(data.VOCAB)))
    scores = tt.fact_scores(random_model, corpus.probes)
    assert scores["fact_greedy"] == 0.0
    assert abs(scores["fact_mc"] - scores["fact_chance"]) < 0.06  # 400 probes: chance ± noise
    acc, loss = tt.task_scores(random_model, problems)
    assert acc == 0.0 and abs(loss - math.log(len(data.VOCAB))) < 0.5  # about uniform over the vocabulary


def test_help_lists_every_flag_with_default(capsys):
    with pytest.raises(SystemExit) as e:
        tt.parse_args(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for f in fields(tt.Config):
        assert f"--{f.name}" in text and f"(default: {f.default!r})" in text, f.name


def test_flags_override_the_preset():
    cfg = tt.parse_args(["--preset", "smoke", "--n_embd", "48", "--compile", "--no-resume"])
    assert cfg.n_embd == 48 and cfg.n_layer == 2 and cfg.compile is True and cfg.resume is False
    assert tt.parse_args([]) == tt.Config()


def test_bad_input_gives_one_line_and_nonzero_exit(smoke_dir, tmp_path):
    out, _ = smoke_dir
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    Path(pretrain.pretrained_path(replace(SMOKE, out_dir=str(corrupt)))).write_bytes(b"not a checkpoint")
    pair = ["--preset", "smoke", "--out_dir", str(out)]  # the main command: a run and its baseline
    smoke = pair + ["--compare", "none"]
    cases = {
        "compare": (pair + ["--compare", "sgd"], "--compare"),
        "pair": (pair + ["--run_name", "never_ran_pair", "--resume"], "no checkpoint"),
        "method": (smoke + ["--method", "sgd"], "--method"),
        "alpha": (smoke + ["--alpha", "1.5"], "alpha must be in (0, 1]"),
        "hft_ratio": (smoke + ["--method", "hft", "--hft_ratio", "0"], "--method hft: ratio"),
        "device": (smoke + ["--device", "cuda" if not torch.cuda.is_available() else "cuda:99"],
                   "no such CUDA device"),
        "no_device": (smoke + ["--device", "tpu9"], "--device: unknown device"),
        "task": (smoke + ["--tasks", "add,divide"], "divide"),
        "flag": (smoke + ["--no_such_flag", "1"], "no_such_flag"),
        "type": (smoke + ["--alpha", "much"], "alpha"),
        "corrupt": (["--preset", "smoke", "--out_dir", str(corrupt)], "cannot read checkpoint"),
        "corpus": (smoke + ["--corpus", "v3"], "--corpus"),
        "mismatch": (smoke + ["--method", "full", "--run_name", "full", "--resume", "--lr", "0.01"], "lr=0.001"),
        "compile": (smoke + ["--method", "full", "--run_name", "full", "--resume", "--compile"], "compile=False"),
        "resume": (smoke + ["--run_name", "never_ran", "--resume"], "no checkpoint"),
        "fsdp": (smoke + ["--method", "lora", "--fsdp"], "--fsdp"),
        "nan": (smoke + ["--run_name", "nan", "--lr", "1e30", "--ckpt_interval", "1"], "loss is nan"),
    }
    procs = {name: subprocess.Popen([sys.executable, str(ROOT / "train_tiny.py"), *argv], text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, (argv, _) in cases.items()}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode != 0, name
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("train_tiny.py: error:"), (name, err)
        assert cases[name][1] in lines[0], (name, lines[0])
    # the diverged run left its last checkpoint readable and no half-written file
    assert tt.read_checkpoint(str(out / "nan.pt"))["iter_num"] >= 1 and not list(out.glob("*.tmp"))


def test_lora_trains_only_BA_and_merges_into_the_same_names():
    torch.manual_seed(0)
    model = tt.TinyLlama(ModelConfig(2, 2, 32, 16, len(data.VOCAB)))
    names = [n for n, _ in model.named_parameters()]
    params, _ = tt.lora_params(model, replace(SMOKE, rank=4), stage=0)
    assert len(params) == 2 * 7 * 2 and all(p.requires_grad for p in params)  # A, B on 7 matrices, 2 blocks
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    x = torch.randint(len(data.VOCAB), (3, 16))
    with torch.no_grad():
        for p in params:
            p.normal_()  # B != 0, so the adapter changes the function
        before = model(x)[0]
    tt.end_stage(model)
    assert [n for n, _ in model.named_parameters()] == names
    assert all(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(model(x)[0], before, rtol=1e-4, atol=1e-4)


def test_lora_on_q_and_v_adapts_only_those_two_matrices():
    model = tt.TinyLlama(ModelConfig(2, 2, 32, 16, len(data.VOCAB)))
    params, _ = tt.lora_params(model, replace(SMOKE, rank=4, lora_targets="qv"), stage=0)
    adapted = sorted({n.split(".parametrizations")[0].split(".")[-1] for n, p in model.named_parameters() if "lora_" in n})
    assert adapted == ["q_proj", "v_proj"] and len(params) == 2 * 2 * 2  # A, B on 2 matrices, 2 blocks
    assert report.label(dict(vars(replace(SMOKE, method="lora", lora_targets="qv"))), "rank") == "lora rank=8 on qv"
    with pytest.raises(ValueError, match="--lora_targets"):
        tt.check_config(replace(SMOKE, lora_targets="q"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["mofo", "hft"])
def test_cuda_smoke_run_with_bf16_autocast(tmp_path, method):
    m = tt.run(replace(SMOKE, out_dir=str(tmp_path), method=method, device="cuda"))
    assert m["heldout_loss_before"] < math.log(len(data.VOCAB)) - 1.0
    assert m["curve"][-1]["add_loss"] < m["curve"][0]["add_loss"] and m["dist_abs"] > 0


def test_get_lr_warms_up_linearly_then_decays_by_cosine_to_a_tenth():
    lr, warm, n = 1e-3, 10, 110
    assert [tt.get_lr(i, lr, warm, n) for i in range(warm)] == pytest.approx([lr * (i + 1) / warm for i in range(warm)])
    assert tt.get_lr(warm, lr, warm, n) == pytest.approx(lr)              # the peak, where the cosine starts
    assert tt.get_lr(warm + 50, lr, warm, n) == pytest.approx(lr * 0.55)  # half way: the mean of lr and lr/10
    assert tt.get_lr(n, lr, warm, n) == pytest.approx(lr * 0.1)
    after = [tt.get_lr(i, lr, warm, n) for i in range(warm, n)]
    assert all(a >= b for a, b in zip(after, after[1:]))


@pytest.mark.parametrize("method", ["l1", "l2"])
def test_the_penalty_is_the_norm_of_the_distance_from_theta0(method):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 4)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert tt.penalty(model, theta0, tt.METHODS[method].penalty).item() == 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    delta = torch.cat([(p - theta0[n]).flatten() for n, p in model.named_parameters()])
    want = delta.abs().sum() if method == "l1" else (delta ** 2).sum()
    torch.testing.assert_close(tt.penalty(model, theta0, tt.METHODS[method].penalty), want)
    model.bias.requires_grad_(False)  # only what is trained is pulled
    want = (delta[:20].abs().sum() if method == "l1" else (delta[:20] ** 2).sum())
    torch.testing.assert_close(tt.penalty(model, theta0, tt.METHODS[method].penalty), want)


def test_l2_with_no_pull_is_full_finetuning_and_a_pull_keeps_closer(smoke_dir):
    out, _ = smoke_dir
    run = lambda **kw: tt.run(replace(SMOKE, out_dir=str(out), max_iters=6, log_interval=0, **kw))
    full, free, pulled = run(method="full", run_name="f"), run(method="l2", reg=0.0, run_name="l0"), \
        run(method="l2", reg=50.0, run_name="l50")
    assert free["curve"] == full["curve"] and free["dist_abs"] == full["dist_abs"]
    assert pulled["dist_abs"] < 0.9 * full["dist_abs"]


def test_replay_mixes_text_windows_with_weights_that_sum_to_one():
    cfg = replace(SMOKE, replay=0.25, batch_size=8)
    corpus = data.build_corpus(cfg.data_seed, cfg.n_people, cfg.filler, cfg.corpus, cfg.arith)
    held_out = {"add": set()}
    (x, y, w), (xr, yr, wr) = tt.get_batch(cfg, ["add"], 0, __import__("random").Random(0), held_out,
                                           corpus.train, 0, 1, "cpu")
    assert len(x) == 6 and len(xr) == 2 and (w, wr) == (0.75, 0.25)  # round(0.25 * 8) = 2 rows of text
    assert xr.shape[1] == cfg.block_size // tt.REPLAY_CONTEXT_DIVISOR and (yr >= 0).all()  # every token a target
    assert torch.equal(xr[:, 1:], yr[:, :-1])  # text windows: the targets are the next characters
    assert len(tt.get_batch(replace(cfg, replay=0.0), ["add"], 0, __import__("random").Random(0), held_out,
                            corpus.train, 0, 1, "cpu")) == 1


def test_hft_leaves_the_frozen_half_bitwise_at_theta0(smoke_dir):
    out, _ = smoke_dir
    cfg = replace(SMOKE, out_dir=str(out), method="hft", run_name="hft_frozen", max_iters=10, lr=1e-2)
    tt.run(cfg)
    ckpt = tt.read_checkpoint(str(out / "hft_frozen.pt"))
    theta0 = tt.read_checkpoint(pretrain.pretrained_path(cfg))["model"]
    trainable = set(ckpt["hft"])
    assert trainable and set(theta0) - trainable
    for name, w in ckpt["model"].items():
        assert torch.equal(w, theta0[name]) == (name not in trainable), name


def test_mofo_fraction_changed_matches_the_weights_and_the_optimizer(smoke_dir, monkeypatch):
    """One MoFO step moves exactly the entries its masks select: what the run reports as changed in
    the weights is what the optimizer says it updated (no weight decay, a single step)."""
    out, _ = smoke_dir
    made = []

    def recording(params, cfg):
        made.append(tt.make_mofo(params, cfg))
        return made[-1]

    # a new method is one table entry: here MoFO with its optimizer recorded
    monkeypatch.setitem(tt.METHODS, "mofo", tt.Method(tt.all_params, recording))
    m = tt.run(replace(SMOKE, out_dir=str(out), method="mofo", run_name="mofo_once", max_iters=1,
                       warmup_iters=1, alpha=0.1))
    assert m["frac_changed"] == pytest.approx(made[-1].last_update_fraction, abs=1e-12)
    assert 0.09 < m["frac_changed"] < 0.2  # α of every matrix, and the small norm vectors densely


def test_an_edit_of_mofo_py_changes_what_the_mofo_run_trains(smoke_dir, monkeypatch):
    # the run steps mofo.py's MoFO, the code a student reads: an edit of its score (here the
    # smallest |m| first) is what trains, not a fast path's copy of it
    import mofo
    out, _ = smoke_dir
    cfg = replace(SMOKE, out_dir=str(out), method="mofo", max_iters=3, warmup_iters=1,
                  log_interval=0, ckpt_interval=0)
    tt.run(replace(cfg, run_name="score_as_is"))
    tt.run(replace(cfg, run_name="score_as_is_again"))
    monkeypatch.setattr(mofo, "filter_score", lambda filter, grad, m, denom, out=None: -m.abs())
    tt.run(replace(cfg, run_name="score_edited"))
    read = lambda name: tt.read_checkpoint(str(out / f"{name}.pt"))["model"]
    assert states_equal(read("score_as_is"), read("score_as_is_again"))
    assert not states_equal(read("score_as_is"), read("score_edited"))


def test_a_config_field_without_a_comment_gets_an_empty_help(monkeypatch):
    @dataclass
    class Bare(tt.Config):
        extra: int = 0
    monkeypatch.setattr(tt, "Config", Bare)
    assert "extra" not in tt.field_help()
    assert tt.parse_args(["--extra", "3"]).extra == 3  # its flag exists, with an empty help


def test_a_stale_pretrained_checkpoint_is_trained_again_and_says_why(smoke_dir, capsys):
    out, _ = smoke_dir
    cfg = replace(SMOKE, out_dir=str(out))
    path = pretrain.pretrained_path(cfg)
    good = tt.read_checkpoint(path)
    loop.save_checkpoint({**good, "fingerprint": {**good["fingerprint"], "corpus": "0" * 12}}, path)
    corpus = data.build_corpus(cfg.data_seed, cfg.n_people, cfg.filler, cfg.corpus, cfg.arith)
    again = tt.load_or_pretrain(cfg, corpus, "cpu", nullcontext(), 0, 1)
    assert "corpus changed since" in capsys.readouterr().out
    assert again["fingerprint"] == pretrain.pretrained_stamp(corpus) == tt.read_checkpoint(path)["fingerprint"]
    assert states_equal(again["model"], good["model"])  # same corpus and code: the same weights again
    tt.load_or_pretrain(cfg, corpus, "cpu", nullcontext(), 0, 1)
    assert "pre-training" not in capsys.readouterr().out  # now it is served
    assert pretrain.pretrained_path(replace(cfg, compile=True)) != path  # compiled pre-training rounds apart: its own file


def test_the_shipped_pretrained_checkpoint_follows_the_code_in_front_of_it():
    """The default model's checkpoint is committed (results/pretrained-<key>.pt) so that a fresh clone
    fine-tunes at once; an edit of the corpus or the model/loop code must come with a new one."""
    cfg = tt.Config()
    path = Path(pretrain.shipped_path(cfg))
    assert path.parent == ROOT / "results" and path.name == Path(pretrain.pretrained_path(cfg)).name
    shipped = tt.read_checkpoint(str(path))
    corpus = data.build_corpus(cfg.data_seed, cfg.n_people, cfg.filler, cfg.corpus, cfg.arith)
    assert shipped["fingerprint"] == pretrain.pretrained_stamp(corpus), "re-train it: python train_tiny.py on an empty out/, then copy its pretrained-<key>.pt to results/"
    assert {k: shipped["config"][k] for k in pretrain.PRETRAIN_KEYS} == {k: getattr(cfg, k) for k in pretrain.PRETRAIN_KEYS}
    assert shipped["metrics"]["fact_mc"] >= 0.95 and shipped["metrics"]["add_acc"] == 0.0  # knows the facts, not the task


def test_an_empty_out_dir_is_served_the_shipped_checkpoint(tmp_path, monkeypatch):
    cfg = replace(tt.Config(), out_dir=str(tmp_path))
    monkeypatch.setattr(pretrain, "pretrain", lambda *a: pytest.fail("pre-trained although a checkpoint ships"))
    corpus = data.build_corpus(cfg.data_seed, cfg.n_people, cfg.filler, cfg.corpus, cfg.arith)
    got = tt.load_or_pretrain(cfg, corpus, "cpu", nullcontext(), 0, 1)
    assert states_equal(got["model"], tt.read_checkpoint(pretrain.shipped_path(cfg))["model"])


def test_the_main_command_compares_with_full_finetuning_side_by_side(smoke_dir, capsys):
    """Two runs from one command: the same pre-trained model, seed, rate and steps, each in its own
    process on one thread; each equal to the same run made alone (one thread)."""
    out, _ = smoke_dir
    assert tt.main(["--preset", "smoke", "--out_dir", str(out), "--method", "mofo", "--run_name", "pair"]) == 0
    text = capsys.readouterr().out
    pair, base = (json.loads((out / f"{n}.json").read_text()) for n in ("pair", "pair-full"))
    assert (pair["config"]["method"], base["config"]["method"]) == ("mofo", "full")
    for k in ("seed", "lr", "max_iters", "batch_size", "data_seed"):
        assert pair["config"][k] == base["config"][k], k
    assert base["pretrained_fingerprint"] == pair["pretrained_fingerprint"] and base["R0"] == pair["R0"]
    assert (out / "pair.png").stat().st_size > 0
    # one table: a row per curve point with both runs, then the end point with both columns
    assert "mofo alpha=0.1" in text and "full" in text and "end point" in text
    steps = [p["iter"] for p in pair["curve"]]
    for step, p, b in zip(steps, pair["curve"], base["curve"]):
        assert any(line.split()[:5] == [str(step), f"{p['add_acc']:.1%}", f"{p['fact_mc']:.1%}",
                                        f"{b['add_acc']:.1%}", f"{b['fact_mc']:.1%}"] for line in text.splitlines()), step
    facts = next(line for line in text.splitlines() if line.startswith("facts kept, MC"))
    assert facts.split()[-2:] == [f"{pair['fact_mc_after']:.1%}", f"{base['fact_mc_after']:.1%}"]
    # it ends saying what the comparison is, and what it is not, in the study's words
    last = text.rstrip().splitlines()[-4:-2]
    assert last[0].startswith("What this is: mofo alpha=0.1 and full at the same rate 0.001")
    assert last[1] == "What it is not: " + " ".join(report.summary_lines())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = tt.run(replace(SMOKE, out_dir=str(out), method="mofo", run_name="alone"))
    finally:
        torch.set_num_threads(threads)
    same = ("R", "curve", "fact_mc_after", "heldout_loss_after", "dist_abs", "frac_changed")
    assert {k: alone[k] for k in same} == {k: pair[k] for k in same}


def test_the_last_lines_come_from_the_study_summary(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"main_command": ["Full at its best rate keeps 90 %.", "Seeds: 3."]}))
    assert report.summary_lines(path) == ["Full at its best rate keeps 90 %.", "Seeds: 3."]
    assert "is not in results/" in report.summary_lines(tmp_path / "missing.json")[0]


def test_a_single_run_prints_its_curve(smoke_dir, capsys):
    out, _ = smoke_dir
    assert tt.main(["--preset", "smoke", "--out_dir", str(out), "--method", "hft", "--compare", "none",
                    "--run_name", "single"]) == 0
    text = capsys.readouterr().out
    m = json.loads((out / "single.json").read_text())
    assert "along training" in text and "hft hft_ratio=0.5" in text and not (out / "single-full.json").exists()
    rows = [line.split() for line in text.splitlines() if line.split()[:1] == [str(m["curve"][-1]["iter"])]]
    assert rows and rows[-1][1:3] == [f"{m['curve'][-1]['add_acc']:.1%}", f"{m['curve'][-1]['fact_mc']:.1%}"]
    assert (out / "single.png").stat().st_size > 0
