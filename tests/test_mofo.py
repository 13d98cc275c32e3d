"""Tests for mofo.py: oracle checks against torch.optim.AdamW and torch.topk, exact counts,
state_dict round trips, and argument checks. CPU, seconds."""
import copy
import io
import math
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mofo
import mofo_fast
from mofo import MoFO, topk_mask_reference
from mofo_fast import filter_fast_, topk_threshold


def make(fast):
    """The optimizer under test: the opt-in fast path (mofo_fast.MoFO) or the readable mofo.MoFO."""
    return mofo_fast.MoFO if fast else MoFO


def reference_mask(x, k):
    """The obvious exact mask: |x| >= the k-th largest |x| from a full, sorted torch.topk
    (written here independently of mofo.topk_mask_reference, which these tests also check)."""
    a = x.abs()
    return a >= torch.topk(a.reshape(-1), k).values[-1]


def fast_matches_reference(x, k, sampled=None):
    """Whether the fast path finds the reference mask of |x| for this k: topk_threshold's tau and
    count, and filter_fast_'s kept momentum (the hardshrink on CPU) bit for bit."""
    mask = reference_mask(x, k)
    if not torch.equal(topk_mask_reference(x.abs(), k), mask):
        return False
    tau, count = mofo_fast.topk_threshold(x.abs(), k, sampled=sampled)
    kept = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    kept_count = filter_fast_("momentum", None, x, None, k, None, kept, None)
    return (torch.equal(x.abs() >= tau, mask) and int(count) == int(mask.sum()) == int(kept_count)
            and torch.equal(kept, x * mask))


def small_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def loss_on_batch(model, step):
    gen = torch.Generator().manual_seed(1000 + step)  # drawn on the CPU: the same batch on any device
    device = next(model.parameters()).device
    x, y = torch.randn(32, 6, generator=gen).to(device), torch.randn(32, 3, generator=gen).to(device)
    return torch.nn.functional.mse_loss(model(x), y)


def train(model, opt, steps, start=0):
    for step in range(start, start + steps):
        opt.zero_grad()
        loss_on_batch(model, step).backward()
        opt.step()


def set_grads(params, step):
    gen = torch.Generator().manual_seed(step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


# --- alpha = 1 is AdamW -------------------------------------------------------------------

@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("maximize", [False, True])
def test_alpha_one_is_adamw_bitwise(weight_decay, maximize, fast):
    model_a, model_b = small_model(), small_model()
    opt_a = make(fast)(model_a.parameters(), lr=1e-2, betas=(0.8, 0.95), eps=1e-6,
                 weight_decay=weight_decay, alpha=1.0, maximize=maximize)
    opt_b = torch.optim.AdamW(model_b.parameters(), lr=1e-2, betas=(0.8, 0.95), eps=1e-6,
                              weight_decay=weight_decay, maximize=maximize, foreach=False)
    train(model_a, opt_a, 50)
    train(model_b, opt_b, 50)
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt_a.state[p][key], opt_b.state[q][key])
    assert opt_a.last_update_fraction == 1.0


def test_selected_entries_follow_adamw_exactly():
    # Moments are dense, so with the same gradients MoFO's moments equal AdamW's at every
    # step; each step, selected entries land exactly where AdamW would put them from the
    # same point, and the others do not move.
    torch.manual_seed(0)
    shapes = [(40, 50), (400, 250)]  # the second goes through the sampled threshold
    p_mofo = [torch.randn(s, requires_grad=True) for s in shapes]
    p_adam = [p.detach().clone().requires_grad_() for p in p_mofo]
    opt = MoFO(p_mofo, lr=1e-2, weight_decay=0.05, alpha=0.2)
    ref = torch.optim.AdamW(p_adam, lr=1e-2, weight_decay=0.05, foreach=False)
    for step in range(5):
        with torch.no_grad():
            for p, q in zip(p_mofo, p_adam):
                q.copy_(p)
        before = [p.detach().clone() for p in p_mofo]
        set_grads(p_mofo, step)
        set_grads(p_adam, step)
        opt.step()
        ref.step()
        for p, q, b in zip(p_mofo, p_adam, before):
            mask = reference_mask(opt.state[p]["exp_avg"], math.floor(0.2 * p.numel()))
            decayed = b * (1 - 1e-2 * 0.05)
            assert torch.equal(p[mask], q[mask])
            assert torch.equal(p[~mask], decayed[~mask])
            assert torch.equal(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"])
            assert torch.equal(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"])


# --- the fast threshold is the exact one --------------------------------------------------

def mask_cases():
    gen = torch.Generator().manual_seed(0)
    big = torch.randn(400, 250, generator=gen)  # > 4 * SAMPLE_SIZE entries: the sampled path
    assert big.numel() > 4 * mofo_fast.SAMPLE_SIZE
    yield "random small", torch.randn(37, 41, generator=gen)
    yield "random big", big
    yield "odd size", torch.randn(70001, generator=gen)  # not a multiple of 8
    yield "many ties", torch.randint(-3, 4, (400, 250), generator=gen).float()
    yield "ties at tau", torch.cat([torch.ones(30000), torch.randn(40000, generator=gen)])
    yield "all zeros", torch.zeros(400, 250)
    yield "one element", torch.tensor([[-2.5]])
    yield "huge and tiny", torch.randn(400, 250, generator=gen) * 10.0 ** torch.randint(-40, 38, (400, 250), generator=gen)
    yield "subnormals", torch.randn(70000, generator=gen) * 1e-42
    yield "transposed view", big.t()
    yield "strided view", big[::2, 1::3]
    yield "float64", torch.randn(400, 250, generator=gen, dtype=torch.float64)
    yield "bfloat16", torch.randn(400, 250, generator=gen).bfloat16()


def ks(n):
    return sorted({1, 2, n // 100, n // 10, n // 3, n // 2, n - 1, n} & set(range(1, n + 1)))


@pytest.mark.parametrize("name,x", list(mask_cases()), ids=[c[0] for c in mask_cases()])
def test_fast_mask_equals_torch_topk(name, x):
    for k in ks(x.numel()):
        assert fast_matches_reference(x, k), (name, k)


@pytest.mark.parametrize("name,x", [c for c in mask_cases() if c[1].numel() >= mofo_fast.SAMPLE_SIZE],
                         ids=[c[0] for c in mask_cases() if c[1].numel() >= mofo_fast.SAMPLE_SIZE])
def test_forced_sampled_path_equals_torch_topk(name, x):
    # sampled=True is what the CUDA test below runs; here it also covers tensors between
    # SAMPLE_SIZE and 4 * SAMPLE_SIZE entries, which the default sends to a direct torch.topk
    for x in (x, x.reshape(-1)[:mofo_fast.SAMPLE_SIZE + 13]):
        for k in ks(x.numel()):
            mask = reference_mask(x, k)
            tau, count = topk_threshold(x.abs(), k, sampled=True)
            assert torch.equal(x.abs() >= tau, mask) and int(count) == int(mask.sum()), (name, k)


def test_topk_threshold_count_and_exactly_k_without_ties():
    x = torch.randn(400, 250, generator=torch.Generator().manual_seed(1))
    for k in (1, 7, 10000, 50000, 99999):
        tau, count = topk_threshold(x.abs(), k)
        assert count == k == int(reference_mask(x, k).sum())
        assert tau == torch.topk(x.abs().reshape(-1), k).values[-1]


def test_topk_threshold_when_the_bracket_misses(monkeypatch):
    # A bracket of zero width misses tau on one side or the other most of the time; the
    # fallback to a full selection must still give the exact mask.
    monkeypatch.setattr(mofo_fast, "SAMPLE_Z", 0.0)
    full_selections = []
    kth = mofo_fast.kth_largest
    monkeypatch.setattr(mofo_fast, "kth_largest", lambda x, k: full_selections.append(x.numel()) or kth(x, k))
    gen = torch.Generator().manual_seed(2)
    for _ in range(10):
        x = torch.randn(400, 250, generator=gen)
        for k in (10, 10000, 80000):
            assert fast_matches_reference(x, k)
    assert 100000 in full_selections  # the fallback did run


def test_off_by_one_in_the_fast_path_is_caught(monkeypatch):
    # The comparisons above must tell the k-th from the (k+1)-th value: with the fast path's
    # exact selection shifted by one, the mask comparison fails on the sampled and the direct
    # path, and the fast optimizer drifts from the reference one.
    x = torch.randn(400, 250, generator=torch.Generator().manual_seed(3))
    assert fast_matches_reference(x, 10000) and fast_matches_reference(x, 10000, sampled=False)
    kth = mofo_fast.kth_largest
    monkeypatch.setattr(mofo_fast, "kth_largest", lambda x, k: kth(x, min(k + 1, x.numel())))
    assert not fast_matches_reference(x, 10000)
    assert not fast_matches_reference(x, 10000, sampled=False)
    threshold = mofo_fast.topk_threshold
    monkeypatch.setattr(mofo_fast, "kth_largest", kth)
    monkeypatch.setattr(mofo_fast, "topk_threshold", lambda s, k, *args, **kwargs: threshold(s, k + 1, *args, **kwargs))
    fast, ref = train_both_paths("momentum", steps=2)
    assert not all(torch.equal(p, q) for p, q in zip(fast.parameters(), ref.parameters()))


def wide_model(seed=0):
    # the first weight (300 x 250 = 75000 entries) takes the sampled threshold; the rest are small
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(250, 300), torch.nn.Tanh(), torch.nn.Linear(300, 3),
                               torch.nn.Tanh(), torch.nn.Linear(3, 2))


def train_both_paths(filter, steps, device="cpu"):
    """The same model trained with mofo_fast.MoFO and with mofo.MoFO; returns the two models."""
    models = []
    for fast in (True, False):
        model = wide_model().to(device)
        opt = make(fast)(model.parameters(), lr=1e-2, alpha=0.1, filter=filter, weight_decay=0.01,
                         seed=3)
        fractions = []
        for step in range(steps):
            gen = torch.Generator().manual_seed(step)
            x, y = torch.randn(16, 250, generator=gen).to(device), torch.randn(16, 2, generator=gen).to(device)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            fractions.append(opt.last_update_fraction)
        model.opt, model.fractions = opt, fractions
        models.append(model)
    return models


@pytest.mark.parametrize("filter", mofo.FILTERS)
def test_fast_and_reference_paths_are_bitwise_identical(filter):
    fast, ref = train_both_paths(filter, steps=20)
    for p, q in zip(fast.parameters(), ref.parameters()):
        assert torch.equal(p, q)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(fast.opt.state[p][key], ref.opt.state[q][key])
    assert fast.fractions == ref.fractions
    assert torch.equal(fast.opt.generator.get_state(), ref.opt.generator.get_state())


# --- the optimizer ------------------------------------------------------------------------

def score_after_step(opt, p, filter):
    """What `filter` ranked in the step just taken, recomputed from the optimizer's state."""
    state = opt.state[p]
    if filter == "gradient":
        return p.grad.abs()
    if filter == "momentum":
        return state["exp_avg"].abs()
    bias_correction2_sqrt = (1 - 0.999 ** state["step"].item()) ** 0.5
    return state["exp_avg"].abs() / (state["exp_avg_sq"].sqrt() / bias_correction2_sqrt).add(1e-8)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("filter", mofo.FILTERS)
def test_exactly_floor_alpha_n_entries_move(filter, fast):
    # weights start at 0, so that no selected entry's update is lost to rounding
    matrices = [torch.zeros(40, 50, requires_grad=True), torch.zeros(400, 250, requires_grad=True),
                torch.zeros(3, 3, requires_grad=True)]  # floor(0.1 * 9) = 0 -> max(1, k) = 1
    vector = torch.zeros(50, requires_grad=True)
    params = matrices + [vector]
    opt = make(fast)(params, lr=1e-3, alpha=0.1, filter=filter)
    total = sum(p.numel() for p in params)
    for step in range(4):
        before = [p.detach().clone() for p in params]
        moments = [opt.state[p]["exp_avg"].clone() for p in params] if step else None
        set_grads(params, step)
        opt.step()
        moved = [p != b for p, b in zip(params, before)]
        counts = []
        for p, mv, k in zip(matrices, moved, (200, 10000, 1)):
            if filter == "random":  # exactly k drawn entries
                assert int(mv.sum()) == k
                counts.append(k)
                continue
            mask = reference_mask(score_after_step(opt, p, filter), k)  # ties at tau kept
            assert torch.equal(mv, mask)
            counts.append(int(mask.sum()))
            if filter != "update":  # random floats do not tie: exactly k
                assert counts[-1] == k
        if filter == "update" and step == 0:  # |m|/denom ~ 0.1 everywhere at t = 1: ties at tau
            assert counts[1] > 10000
        assert bool(moved[3].all())  # 1-D tensors are dense
        assert opt.last_update_fraction == (sum(counts) + 50) / total
        if step:  # every entry's momentum moves, selected or not
            for p, m0 in zip(params, moments):
                assert bool((opt.state[p]["exp_avg"] != m0).all())


def test_update_filter_picks_largest_adam_step():
    torch.manual_seed(0)
    p = torch.randn(60, 70, requires_grad=True)
    opt = MoFO([p], lr=1e-3, alpha=0.1, filter="update")
    for step in range(3):
        set_grads([p], step)
        opt.step()
    before = p.detach().clone()
    set_grads([p], 3)
    # predict the step: moments and Adam step size per entry, then the top 10% of them
    m = opt.state[p]["exp_avg"].lerp(p.grad, 0.1)
    v = opt.state[p]["exp_avg_sq"].mul(0.999).addcmul(p.grad, p.grad, value=0.001)
    update = m.abs() / ((v.sqrt() / math.sqrt(1 - 0.999 ** 4)).add(1e-8))
    opt.step()
    assert torch.equal(p != before, reference_mask(update, 420))


def test_gradient_filter_picks_largest_gradients():
    torch.manual_seed(0)
    p = torch.randn(60, 70, requires_grad=True)
    opt = MoFO([p], lr=1e-3, alpha=0.1, filter="gradient")
    for step in range(3):
        before = p.detach().clone()
        set_grads([p], step)
        opt.step()
        assert torch.equal(p != before, reference_mask(p.grad, 420))


def test_random_filter_is_seeded():
    def moved_sets(seed):
        torch.manual_seed(0)
        p = torch.randn(60, 70, requires_grad=True)
        opt = MoFO([p], alpha=0.1, filter="random", seed=seed)
        sets = []
        for step in range(3):
            before = p.detach().clone()
            set_grads([p], step)
            opt.step()
            sets.append(p != before)
        return sets
    a, b, c = moved_sets(0), moved_sets(0), moved_sets(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(a[0], a[1])  # a fresh draw every step


def test_random_filter_leaves_global_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(4)
    p = torch.randn(400, 250, requires_grad=True)
    opt = MoFO([p], alpha=0.1, filter="random")
    q = torch.randn(400, 250, requires_grad=True)
    opt_m = MoFO([q], alpha=0.1)
    torch.manual_seed(5)
    for step in range(2):
        set_grads([p, q], step)
        opt.step()
        opt_m.step()
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("filter", mofo.FILTERS)
def test_state_dict_round_trip_in_lock_step(filter):
    model_a = small_model()
    opt_a = MoFO(model_a.parameters(), lr=1e-2, alpha=0.3, filter=filter, weight_decay=0.01, seed=7)
    train(model_a, opt_a, 5)
    buffer = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    model_b = small_model(seed=99)
    model_b.load_state_dict(checkpoint["model"])
    opt_b = MoFO(model_b.parameters(), lr=1e-2, alpha=0.3, filter=filter, weight_decay=0.01, seed=8)
    opt_b.load_state_dict(checkpoint["opt"])
    assert torch.equal(copy.deepcopy(opt_a).generator.get_state(), opt_a.generator.get_state())
    model_c = small_model(seed=98)
    model_c.load_state_dict(model_a.state_dict())
    opt_c = MoFO(model_c.parameters(), lr=1e-2, alpha=0.3, filter=filter, weight_decay=0.01)
    opt_c.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    train(model_a, opt_a, 5, start=5)
    train(model_b, opt_b, 5, start=5)
    train(model_c, opt_c, 5, start=5)
    for p, q, r in zip(model_a.parameters(), model_b.parameters(), model_c.parameters()):
        assert torch.equal(p, q) and torch.equal(p, r)


def test_lr_scheduler_drives_the_step():
    torch.manual_seed(0)
    p = torch.randn(20, 30, requires_grad=True)
    opt = MoFO([p], lr=0.1, alpha=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: [1.0, 0.0, 0.5][step % 3])
    lrs, moved = [], []
    for step in range(3):
        before = p.detach().clone()
        set_grads([p], step)
        opt.step()
        lrs.append(opt.param_groups[0]["lr"])
        moved.append(float((p.detach() - before).abs().max()))
        sched.step()
    assert lrs == [0.1, 0.0, 0.05]
    assert moved[0] > 0 and moved[1] == 0 and moved[2] > 0
    opt = MoFO([p], lr=1.0)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    opt.step()
    cosine.step()
    assert cosine.get_last_lr()[0] == pytest.approx(0.5 * (1 + math.cos(math.pi / 10)))


@pytest.mark.parametrize("maximize", [False, True])
def test_quadratic_goes_the_right_way(maximize):
    torch.manual_seed(0)
    target = torch.randn(30, 40)
    x = torch.zeros(30, 40, requires_grad=True)
    opt = MoFO([x], lr=0.05, alpha=0.1, maximize=maximize)

    def closure():
        opt.zero_grad()
        loss = ((x - target) ** 2).sum()
        loss.backward()
        return loss

    losses = [float(opt.step(closure).detach()) for _ in range(200)]
    if maximize:
        assert losses[-1] > 2 * losses[0]
    else:
        assert losses[-1] < 0.1 * losses[0]
        assert losses == sorted(losses, reverse=True)  # monotone on a separable quadratic


def test_non_contiguous_params_match_contiguous_ones():
    torch.manual_seed(0)
    base = torch.randn(250, 400)
    p_t = base.clone().t().requires_grad_()  # (400, 250) stored column-major
    p_c = base.t().contiguous().requires_grad_()
    assert not p_t.is_contiguous() and torch.equal(p_t, p_c)
    opt_t, opt_c = MoFO([p_t], lr=1e-2, alpha=0.1), MoFO([p_c], lr=1e-2, alpha=0.1)
    for step in range(3):
        set_grads([p_c], step)
        p_t.grad = p_c.grad.clone()
        opt_t.step()
        opt_c.step()
    assert torch.equal(p_t, p_c)


def test_params_without_grad_are_untouched():
    model = small_model()
    opt = MoFO(model.parameters(), lr=1e-2, alpha=0.2)
    frozen = model[0].weight
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    train(model, opt, 3)
    assert torch.equal(frozen, before)
    assert frozen not in opt.state


def test_param_groups_are_independent():
    def params():
        torch.manual_seed(0)
        return [torch.randn(40, 50, requires_grad=True), torch.randn(400, 250, requires_grad=True)]
    a, b = params()
    joint = MoFO([{"params": [a], "alpha": 0.05, "lr": 1e-2},
                  {"params": [b], "alpha": 0.3, "filter": "gradient", "lr": 1e-3}])
    a2, b2 = params()
    alone_a = MoFO([a2], alpha=0.05, lr=1e-2)
    alone_b = MoFO([b2], alpha=0.3, filter="gradient", lr=1e-3)
    for step in range(4):
        set_grads([a, b], step)
        set_grads([a2, b2], step)
        joint.step()
        alone_a.step()
        alone_b.step()
    assert torch.equal(a, a2) and torch.equal(b, b2)


def test_bf16_params_keep_fp32_moments():
    # Same gradients (bf16 values) for a bf16 and an fp32 copy of the same weights: the fp32
    # moments agree bit for bit, and the bf16 weights are the fp32 result rounded once.
    torch.manual_seed(0)
    p16 = torch.randn(400, 250).bfloat16().requires_grad_()
    p32 = p16.detach().float().requires_grad_()
    opt16, opt32 = MoFO([p16], lr=1e-2, alpha=0.1), MoFO([p32], lr=1e-2, alpha=0.1)
    for step in range(3):
        p16.grad = torch.randn(400, 250, generator=torch.Generator().manual_seed(step)).bfloat16()
        p32.grad = p16.grad.float()
        with torch.no_grad():
            p32.copy_(p16)
        opt16.step()
        opt32.step()
        assert opt16.state[p16]["exp_avg"].dtype == torch.float32
        assert opt16.state[p16]["exp_avg_sq"].dtype == torch.float32
        assert torch.equal(opt16.state[p16]["exp_avg"], opt32.state[p32]["exp_avg"])
        assert torch.equal(opt16.state[p16]["exp_avg_sq"], opt32.state[p32]["exp_avg_sq"])
        assert p16.dtype == torch.bfloat16 and torch.equal(p16, p32.bfloat16())
    restored = MoFO([p16.detach().clone().requires_grad_()])
    restored.load_state_dict(opt16.state_dict())
    assert next(iter(restored.state.values()))["exp_avg"].dtype == torch.float32


def test_closure_is_called_with_grad_enabled_and_loss_returned():
    x = torch.ones(4, 4, requires_grad=True)
    opt = MoFO([x], alpha=0.5)

    def closure():
        assert torch.is_grad_enabled()
        opt.zero_grad()
        loss = (x ** 2).sum()
        loss.backward()
        return loss

    with torch.no_grad():
        assert float(opt.step(closure)) == 16.0
    assert opt.step() is None


@pytest.mark.parametrize("kwargs,name", [
    (dict(alpha=0.0), "alpha"), (dict(alpha=1.5), "alpha"), (dict(alpha=-0.1), "alpha"),
    (dict(lr=-1e-3), "lr"), (dict(betas=(1.0, 0.999)), "betas"), (dict(betas=(0.9, -0.1)), "betas"),
    (dict(eps=-1e-8), "eps"), (dict(weight_decay=-0.1), "weight_decay"),
    (dict(filter="magnitude"), "filter"),
])
def test_bad_arguments_raise_value_error(kwargs, name):
    with pytest.raises(ValueError, match=name) as info:
        MoFO([torch.zeros(2, 2, requires_grad=True)], **kwargs)
    assert any(ch in str(info.value) for ch in "[(")  # names the allowed range or choices


def test_bad_param_group_raises_value_error():
    opt = MoFO([torch.zeros(2, 2, requires_grad=True)])
    with pytest.raises(ValueError, match="alpha"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "alpha": 2.0})


def test_sparse_gradients_raise_value_error():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = MoFO(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()


# --- the torch.optim conventions AdamW keeps ------------------------------------------------

def complex_params(seed=0):
    """A complex matrix, a complex vector and a real matrix (a complex entry is two real ones)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(30, 40, dtype=torch.complex64, generator=gen)),
            torch.nn.Parameter(torch.randn(7, dtype=torch.complex64, generator=gen)),
            torch.nn.Parameter(torch.randn(20, 10, generator=gen))]


def set_complex_grads(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, dtype=p.dtype, generator=gen)


@pytest.mark.parametrize("fast", [True, False])
def test_complex_alpha_one_is_adamw_bitwise(fast):
    # torch's AdamW steps a complex tensor as torch.view_as_real: so must MoFO, bit for bit
    a, b = complex_params(), complex_params()
    opt_a = make(fast)(a, lr=1e-2, weight_decay=0.1, alpha=1.0)
    opt_b = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.1, foreach=False)
    for step in range(10):
        set_complex_grads(a, step)
        set_complex_grads(b, step)
        opt_a.step()
        opt_b.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_a.state[p][key], opt_b.state[q][key])


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("filter", mofo.FILTERS)
def test_complex_matrix_is_mofo_on_its_real_view(filter, fast):
    # A filtered complex (30, 40) matrix is its real (30, 40, 2) view filtered: 2400 entries,
    # k = 240 of them move; the complex vector of 7 is its (7, 2) real view, a matrix: k = 1.
    params = complex_params()[:2]
    real = [torch.nn.Parameter(torch.view_as_real(p.detach()).clone()) for p in params]
    opt = make(fast)(params, lr=1e-2, alpha=0.1, filter=filter)
    ref = make(False)(real, lr=1e-2, alpha=0.1, filter=filter)
    for step in range(4):
        before = [p.detach().clone() for p in params]
        set_complex_grads(params, step)
        for r, p in zip(real, params):
            r.grad = torch.view_as_real(p.grad).clone()
        opt.step()
        ref.step()
        for p, r in zip(params, real):
            assert torch.equal(torch.view_as_real(p), r)
        moved = [int((torch.view_as_real(p) != torch.view_as_real(b)).sum())
                 for p, b in zip(params, before)]
        assert moved[0] == 240 or (filter == "update" and moved[0] > 240)  # "update" ties at t = 1
        assert moved[1] == 1 or (filter == "update" and moved[1] > 1)  # the vector: filtered
        if moved == [240, 1]:  # of 2 * (1200 + 7) entries: a complex one counts twice
            assert opt.last_update_fraction == (240 + 1) / 2414


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
def test_one_element_tensor_lr_is_adamw_bitwise(shape):
    lr = torch.full(shape, 1e-2)
    model_a, model_b = small_model(), small_model()
    opt_a = MoFO(model_a.parameters(), lr=lr, weight_decay=0.1, alpha=1.0)
    opt_b = torch.optim.AdamW(model_b.parameters(), lr=lr.clone(), weight_decay=0.1,
                              foreach=False)
    train(model_a, opt_a, 10)
    train(model_b, opt_b, 10)
    assert all(torch.equal(p, q) for p, q in zip(model_a.parameters(), model_b.parameters()))


@pytest.mark.parametrize("filter", mofo.FILTERS)
def test_tensor_lr_filtered_fast_equals_reference(filter):
    models = []
    for fast in (True, False):
        model = wide_model()
        opt = make(fast)(model.parameters(), lr=torch.tensor([[1e-2]]), alpha=0.1, filter=filter,
                         weight_decay=0.01)
        for step in range(3):
            gen = torch.Generator().manual_seed(step)
            x, y = torch.randn(16, 250, generator=gen), torch.randn(16, 2, generator=gen)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        models.append(model)
    assert all(torch.equal(p, q) for p, q in zip(*(m.parameters() for m in models)))


def test_several_element_tensor_lr_raises_value_error():
    with pytest.raises(ValueError, match="lr"):
        MoFO([torch.zeros(2, 2, requires_grad=True)], lr=torch.tensor([1e-3, 2e-3]))


@pytest.mark.parametrize("number", [int, float])
def test_a_plain_number_step_from_an_older_checkpoint_loads_and_steps(number):
    model_a = small_model()
    opt_a = MoFO(model_a.parameters(), lr=1e-2, alpha=0.3)
    train(model_a, opt_a, 3)
    saved = copy.deepcopy(opt_a.state_dict())
    for state in saved["state"].values():
        state["step"] = number(state["step"].item())
    model_b = small_model()
    model_b.load_state_dict(model_a.state_dict())
    opt_b = MoFO(model_b.parameters(), lr=1e-2, alpha=0.3)
    opt_b.load_state_dict(saved)
    assert all(torch.is_tensor(s["step"]) and s["step"] == 3 for s in opt_b.state.values())
    train(model_a, opt_a, 3, start=3)
    train(model_b, opt_b, 3, start=3)
    assert all(torch.equal(p, q) for p, q in zip(model_a.parameters(), model_b.parameters()))


def test_deepcopy_and_pickle_keep_last_update_fraction():
    model = small_model()
    opt = MoFO(model.parameters(), lr=1e-2, alpha=0.3)
    train(model, opt, 2)
    assert 0 < opt.last_update_fraction < 1
    for twin in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert twin.last_update_fraction == opt.last_update_fraction
        assert torch.equal(twin.generator.get_state(), opt.generator.get_state())


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("filter", mofo.FILTERS)
def test_zero_size_matrices_are_a_no_op_as_in_adamw(filter, fast):
    # AdamW steps a (0, 5) tensor as a no-op (its step still counts); MoFO's k = max(1, 0) must
    # not ask for one entry of none.
    empty = [torch.nn.Parameter(torch.zeros(0, 5)), torch.nn.Parameter(torch.zeros(4, 0, 3))]
    p = torch.nn.Parameter(torch.randn(40, 50))
    opt = make(fast)(empty + [p], lr=1e-2, alpha=0.1, filter=filter)
    for step in range(2):
        set_grads(empty + [p], step)
        opt.step()
    assert all(opt.state[e]["step"] == 2 and opt.state[e]["exp_avg"].shape == e.shape
               for e in empty)
    assert opt.last_update_fraction == 200 / 2000


def test_a_refused_param_group_stays_out():
    a, b = torch.zeros(4, 4, requires_grad=True), torch.zeros(3, 3, requires_grad=True)
    opt = MoFO([a])
    with pytest.raises(ValueError, match="alpha"):
        opt.add_param_group({"params": [b], "alpha": 2.0})
    assert len(opt.param_groups) == 1
    set_grads([a, b], 0)
    opt.step()  # the refused group is not stepped...
    assert torch.equal(b, torch.zeros(3, 3))
    opt.add_param_group({"params": [b], "alpha": 0.5})  # ...nor does it hold b
    assert len(opt.param_groups) == 2


def test_an_adamw_state_dict_loads_and_continues_as_adamw():
    # the same state names: an AdamW checkpoint loads into MoFO; the hyper-parameters AdamW's
    # groups lack (alpha, filter) come from MoFO's defaults, and with alpha=1 it is AdamW on
    model_a, model_b = small_model(), small_model()
    adamw = torch.optim.AdamW(model_a.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    train(model_a, adamw, 3)
    model_b.load_state_dict(model_a.state_dict())
    opt = MoFO(model_b.parameters(), lr=5.0, alpha=1.0)
    opt.load_state_dict(copy.deepcopy(adamw.state_dict()))  # a copy: not AdamW's live tensors
    group = opt.param_groups[0]
    assert (group["alpha"], group["filter"], group["lr"], group["weight_decay"]) == (
        1.0, "momentum", 1e-2, 0.1)
    train(model_a, adamw, 3, start=3)
    train(model_b, opt, 3, start=3)
    assert all(torch.equal(p, q) for p, q in zip(model_a.parameters(), model_b.parameters()))
    filtered = MoFO(small_model().parameters(), alpha=0.25)  # and alpha < 1 steps on
    filtered.load_state_dict(copy.deepcopy(adamw.state_dict()))
    assert filtered.param_groups[0]["alpha"] == 0.25
    train(small_model(), filtered, 1)


def test_the_torch_optim_contract():
    # every hyper-parameter in defaults and in every group; hooks run; grad-less params skipped
    opt = MoFO([torch.zeros(3, 3, requires_grad=True)])
    assert set(opt.defaults) >= {"lr", "betas", "eps", "weight_decay", "alpha", "filter",
                                 "maximize"}
    assert set(opt.param_groups[0]) >= set(opt.defaults)
    calls = []
    opt.register_step_pre_hook(lambda *args: calls.append("pre"))
    opt.register_step_post_hook(lambda *args: calls.append("post"))
    opt.step()
    assert calls == ["pre", "post"] and len(opt.state) == 0


ALONE = """
import torch, mofo
torch.manual_seed(0)
params = [torch.nn.Parameter(torch.randn(300, 250)), torch.nn.Parameter(torch.randn(50))]
opt = mofo.MoFO(params, lr=1e-2, alpha=0.1, weight_decay=0.01)
for step in range(3):
    gen = torch.Generator().manual_seed(step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
torch.save([p.detach() for p in params], "params.pt")
"""


def test_mofo_py_alone_imports_and_steps_like_the_fast_path(tmp_path):
    # mofo.py is self-contained: copied alone into an empty folder it imports and steps, and ends
    # bitwise where the opt-in fast path (mofo_fast.MoFO) ends.
    shutil.copy(Path(mofo.__file__), tmp_path / "mofo.py")
    run = subprocess.run([sys.executable, "-E", "-c", ALONE], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    alone = torch.load(tmp_path / "params.pt")
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(300, 250)), torch.nn.Parameter(torch.randn(50))]
    opt = mofo_fast.MoFO(params, lr=1e-2, alpha=0.1, weight_decay=0.01)
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, alone))


def test_no_project_module_imports_another_both_ways():
    # mofo.py needs nothing of the project; the fast path imports it, never the other way round
    import ast
    root = Path(mofo.__file__).parent
    project = {f.stem for f in root.glob("*.py")}
    imports = {}
    for f in root.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            found |= {n.split(".")[0] for n in names} & project
        imports[f.stem] = found - {f.stem}
    assert imports["mofo"] == set()
    assert not [(a, b) for a in imports for b in imports[a] if a in imports.get(b, ())]


# --- torch.optim's conventions, as PyTorch's own optimizer tests check them ------------------


@pytest.mark.parametrize("optimizer", [mofo.MoFO, mofo_fast.MoFO])
def test_a_state_dict_is_the_same_after_a_save_and_a_load(optimizer):
    model = wide_model()
    opt = optimizer(model.parameters(), lr=1e-2, alpha=0.1)
    model(torch.randn(4, 250)).sum().backward()
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    again = optimizer(model.parameters(), lr=5e-3, alpha=0.2)
    again.load_state_dict(saved)
    assert again.state_dict()["param_groups"] == saved["param_groups"]
    assert set(again.param_groups[0]) == set(opt.param_groups[0])


def test_bad_hyper_parameters_are_a_value_error_before_params_are_looked_at():
    # AdamW checks its hyper-parameters before it takes the params: MoFO(None, ...) with a bad
    # value is a ValueError that names it, not the TypeError of a None params
    for bad in (dict(lr=torch.tensor([1e-3, 1e-3])), dict(lr=-1.0), dict(alpha=0.0),
                dict(filter="nope"), dict(betas=(1.0, 0.9)), dict(eps=-1.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            MoFO(None, **bad)
    with pytest.raises(ValueError, match="lr"):
        torch.optim.AdamW(None, lr=torch.tensor([1e-3, 1e-3]))  # what AdamW does


@pytest.mark.parametrize("filter", ["momentum", "gradient", "random"])
@pytest.mark.parametrize("fast", [True, False])
def test_a_complex_vector_is_mofo_on_its_real_view(filter, fast):
    # AdamW's convention: a complex parameter is optimized as its real view; a complex vector's
    # real view is an (n, 2) matrix, so MoFO filters it
    torch.manual_seed(0)
    z = torch.nn.Parameter(torch.randn(400, dtype=torch.complex64))
    r = torch.nn.Parameter(torch.view_as_real(z.detach()).clone())
    opt = make(fast)([z], lr=1e-2, alpha=0.1, filter=filter)
    ref = make(fast)([r], lr=1e-2, alpha=0.1, filter=filter)
    for step in range(3):
        g = torch.randn(400, dtype=torch.complex64, generator=torch.Generator().manual_seed(step))
        z.grad, r.grad = g, torch.view_as_real(g).clone()
        opt.step()
        ref.step()
        assert torch.equal(torch.view_as_real(z.detach()), r.detach())
    assert opt.last_update_fraction == ref.last_update_fraction < 0.5


# --- CUDA (skipped on machines without a GPU) -------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("name,x", [c for c in mask_cases() if c[1].numel() >= mofo_fast.SAMPLE_SIZE],
                         ids=[c[0] for c in mask_cases() if c[1].numel() >= mofo_fast.SAMPLE_SIZE])
def test_cuda_sampled_threshold_equals_torch_topk(name, x):
    # On a GPU topk_threshold runs a direct torch.topk unless sampled=True: force the sampled
    # path (the one the CPU uses) so that its comparisons and gathers are checked on CUDA too.
    x = x.cuda()
    n = x.numel()
    for k in sorted({1, n // 100, n // 10, n // 2, n} & set(range(1, n + 1))):
        mask = reference_mask(x, k)
        tau, count = topk_threshold(x.abs(), k, sampled=True)
        assert tau.is_cuda and torch.equal(x.abs() >= tau, mask), (name, k)
        assert int(count) == int(mask.sum()), (name, k)


@needs_cuda
@pytest.mark.parametrize("filter", mofo.FILTERS)
def test_cuda_fast_and_reference_paths_are_bitwise_identical(filter):
    fast, ref = train_both_paths(filter, steps=20, device="cuda")
    for p, q in zip(fast.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    assert fast.fractions == ref.fractions


@needs_cuda
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_cuda_alpha_one_is_adamw_bitwise(weight_decay):
    model_a, model_b = small_model().cuda(), small_model().cuda()
    opt_a = MoFO(model_a.parameters(), lr=1e-2, weight_decay=weight_decay, alpha=1.0)
    opt_b = torch.optim.AdamW(model_b.parameters(), lr=1e-2, weight_decay=weight_decay, foreach=False)
    train(model_a, opt_a, 50)
    train(model_b, opt_b, 50)
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("filter", ["momentum", "random"])
def test_bf16_moves_only_the_mask_with_fp32_moments(device, filter):
    """bf16 gradients tie a lot: the mask is |m| >= tau with ties kept (momentum), or exactly k
    drawn entries (random). Exactly the masked entries whose AdamW step survives rounding to bf16
    move, to where AdamW puts them (a dense alpha=1 twin with the same moments says which and
    where), and the count reported is the mask's."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(300, 200, device=device).bfloat16())
    twin = torch.nn.Parameter(p.detach().clone())
    opt = MoFO([p], lr=1e-2, alpha=0.1, filter=filter)
    dense = MoFO([twin], lr=1e-2, alpha=1.0)
    k = 6000
    for step in range(3):
        before = p.detach().clone()
        with torch.no_grad():
            twin.copy_(p)
        draw = torch.Generator().set_state(opt.generator.get_state())  # the draw opt will make
        p.grad = torch.randn(300, 200, generator=torch.Generator().manual_seed(step)).to(device).bfloat16()
        twin.grad = p.grad.clone()
        opt.step()
        dense.step()
        assert opt.state[p]["exp_avg"].dtype == torch.float32
        assert torch.equal(opt.state[p]["exp_avg"], dense.state[twin]["exp_avg"])
        if filter == "momentum":
            mask = reference_mask(opt.state[p]["exp_avg"], k)
            assert int(mask.sum()) >= k
        else:
            mask = torch.zeros(p.numel(), dtype=torch.bool)
            mask[torch.randperm(p.numel(), generator=draw)[:k]] = True
            mask = mask.view(p.shape).to(device)
        moved, stepped = p != before, twin != before
        assert torch.equal(moved, mask & stepped)
        assert int(moved.sum()) == int((mask & stepped).sum()) > k // 2  # most selected steps survive
        assert torch.equal(p[mask], twin[mask])
        assert opt.last_update_fraction == int(mask.sum()) / p.numel()
