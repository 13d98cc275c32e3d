"""mofo_fast.MoFO(compiled=True): mofo_kernel.py's C step against torch and mofo.MoFO, bit for
bit."""
import math

import pytest
import torch

import mofo
import mofo_fast
import mofo_kernel
from mofo_fast import MoFO


@pytest.fixture(autouse=True)
def compiler():
    try:
        mofo_kernel.library()
    except RuntimeError as e:  # said, not hidden: these tests need cc -fopenmp
        pytest.skip(f"no C compiler with OpenMP here: {e}")


def as_bits(x):  # torch.equal calls -0.0 and 0.0 equal; the bits tell them apart
    return x.contiguous().view(torch.int32)


def cases():
    """Contiguous float32 tensors, the ones the C path takes: sampled above 4 * SAMPLE_SIZE."""
    gen = torch.Generator().manual_seed(0)
    n = 4 * mofo_fast.SAMPLE_SIZE + 1
    yield "small", torch.randn(37, 41, generator=gen)
    yield "one element", torch.tensor([[-2.5]])
    yield "small ties", torch.randint(-2, 3, (4 * mofo_fast.SAMPLE_SIZE,), generator=gen).float()
    yield "random", torch.randn(400, 250, generator=gen)
    yield "odd size", torch.randn(n + 6, generator=gen)  # not a multiple of 8 or of 256
    yield "many ties", torch.randint(-3, 4, (400, 250), generator=gen).float()
    yield "ties at tau", torch.cat([torch.ones(30000), torch.randn(40000, generator=gen)])
    yield "all zeros", torch.zeros(400, 250)
    yield "heavy tails", (torch.randn(400, 250, generator=gen) * 10).exp()
    yield "huge and tiny", torch.randn(400, 250, generator=gen) * 10.0 ** torch.randint(-40, 38, (400, 250), generator=gen)
    yield "subnormals", torch.randn(n, generator=gen) * 1e-42
    yield "sorted", torch.linspace(-1, 1, n)


def ks(n):
    return sorted({1, 2, n // 100, n // 10, n // 3, n // 2, n - 1, n} & set(range(1, n + 1)))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name,x", list(cases()), ids=[c[0] for c in cases()])
def test_threshold_c_is_the_exact_kth_largest(name, x, threads):
    torch.set_num_threads(threads)  # 2 threads: the band's parts are moved together
    try:
        missed = []
        for k in ks(x.numel()):
            found = mofo_kernel.threshold_c(x, k, mofo_fast.SAMPLE_SIZE, mofo_fast.SAMPLE_Z, torch.empty_like(x))
            if found is None:  # the caller then selects in full: slower, never wrong
                missed.append(k)
                continue
            tau = torch.topk(x.abs().reshape(-1), k).values[-1]
            assert found == (tau.item(), int((x.abs() >= tau).sum())), (name, k)
        # A miss is rare where MoFO works (alpha <= 1/2, entries not all alike); near k = n the
        # smallest sampled value is the bracket's lower end, and the global minimum lies below it.
        if x.numel() <= 4 * mofo_fast.SAMPLE_SIZE:  # all band: no bracket to miss
            assert missed == [], (name, missed)
        elif name not in ("many ties", "ties at tau", "all zeros"):
            assert all(k >= x.numel() - 1 for k in missed), (name, missed)
    finally:
        torch.set_num_threads(2)


def test_threshold_c_misses_when_the_bracket_has_no_width():
    # SAMPLE_Z = 0: [lo, hi] is about one sampled value wide and misses tau most of the time;
    # a miss must say so (None), never return a wrong tau
    x = torch.randn(400, 250, generator=torch.Generator().manual_seed(1))
    results = [mofo_kernel.threshold_c(x, k, mofo_fast.SAMPLE_SIZE, 0.0, torch.empty_like(x)) for k in range(1000, 90000, 7919)]
    assert any(r is None for r in results)
    for k, r in zip(range(1000, 90000, 7919), results):
        tau = torch.topk(x.abs().reshape(-1), k).values[-1]
        assert r is None or r == (tau.item(), int((x.abs() >= tau).sum()))


def test_threshold_c_hands_a_nan_to_torch():
    # torch.topk ranks NaN above everything; the kernel leaves such a small tensor to it
    x = torch.randn(1000, generator=torch.Generator().manual_seed(4))
    x[17] = math.nan
    assert mofo_kernel.threshold_c(x, 10, mofo_fast.SAMPLE_SIZE, mofo_fast.SAMPLE_Z, torch.empty_like(x)) is None


def test_apply_c_is_addcdiv_bit_for_bit():
    gen = torch.Generator().manual_seed(2)
    p = torch.randn(1000, 37, generator=gen)
    p[:5] = 0.0
    p[5:10] = -0.0  # -0 + (-0) stays -0, -0 + 0 becomes +0: the order of the operations shows
    m = torch.randn(1000, 37, generator=gen) * 1e-3
    m[::7] = 0.0
    m[1::11] = 2e-3  # ties at tau
    denom = torch.rand(1000, 37, generator=gen) + 1e-8
    for tau in (0.0, 1e-3, 2e-3, math.inf):
        for step in (-1e-3, -0.37, 0.5):
            # MoFO.step's eager step 5: hardshrink keeps |m| >= tau (|m| > the float below tau)
            kept = torch.hardshrink(m, torch.nextafter(torch.tensor(tau), torch.tensor(-math.inf)).item())
            q = p.clone().addcdiv_(kept, denom, value=step)
            r = p.clone()
            mofo_kernel.apply_c(r, m, denom, tau, step)
            assert torch.equal(as_bits(r), as_bits(q)), (tau, step)
            # and mofo_update_'s m * mask: the same numbers (its dropped entries are zeros with
            # m's sign, so a parameter at -0.0 may end at +0.0 there: equal, not the same bits)
            assert torch.equal(r, p.clone().addcdiv_(m * (m.abs() >= tau), denom, value=step))


def models_and_optimizers(compiled, **kwargs):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(250, 400), torch.nn.Tanh(), torch.nn.Linear(400, 300),
                                torch.nn.Tanh(), torch.nn.Linear(300, 2))  # 100,000 and 120,000 entries
    return model, MoFO(model.parameters(), compiled=compiled, **kwargs)


@pytest.mark.parametrize("alpha,weight_decay", [(0.1, 0.0), (0.01, 0.1), (0.5, 0.0)])
def test_compiled_optimizer_is_the_eager_one_bit_for_bit(alpha, weight_decay):
    runs = []
    for compiled in (False, True):
        model, opt = models_and_optimizers(compiled, lr=1e-2, alpha=alpha, weight_decay=weight_decay)
        fractions = []
        for step in range(8):
            gen = torch.Generator().manual_seed(step)
            x, y = torch.randn(16, 250, generator=gen), torch.randn(16, 2, generator=gen)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            if step == 3:
                model[0].weight.grad[:50] = 0.0  # many equal |m| among the smallest
            opt.step()
            fractions.append(opt.last_update_fraction)
        runs.append((model, opt, fractions))
    (eager, eager_opt, eager_fractions), (compiled, compiled_opt, compiled_fractions) = runs
    for p, q in zip(eager.parameters(), compiled.parameters()):
        assert torch.equal(as_bits(p), as_bits(q))
        assert torch.equal(eager_opt.state[p]["exp_avg"], compiled_opt.state[q]["exp_avg"])
    assert eager_fractions == compiled_fractions


def test_compiled_path_takes_float32_tensors_and_hands_back_the_rest(monkeypatch):
    calls = []
    fused = mofo_kernel.moments_threshold_c
    monkeypatch.setattr(mofo_kernel, "moments_threshold_c",
                        lambda g, m, *a: calls.append(m.numel()) or fused(g, m, *a))
    monkeypatch.setattr(mofo_fast, "SAMPLE_Z", 0.0)  # misses too: they fall back to the full selection
    gen = torch.Generator().manual_seed(3)
    params = {"big": torch.randn(400, 250, generator=gen), "small": torch.randn(30, 20, generator=gen),
              "bf16": torch.randn(400, 250, generator=gen).bfloat16(),
              "strided": torch.randn(250, 400, generator=gen).t()}
    results = []
    for compiled in (False, True):
        ps = {name: torch.nn.Parameter(t.clone()) for name, t in params.items()}
        opt = MoFO(ps.values(), lr=1e-2, alpha=0.1, compiled=compiled)
        for step in range(3):
            for p in ps.values():
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step)).to(p.dtype)
            opt.step()
        results.append(ps)
    for name in params:
        assert torch.equal(results[0][name].float(), results[1][name].float()), name
    assert calls == [100000, 600] * 3  # the contiguous float32 ones took the fused step, in order


def test_compiled_takes_complex_matrices_a_tensor_lr_and_empty_matrices(monkeypatch):
    # A complex matrix is stepped as its real view, a contiguous float32 tensor: the C path takes
    # it, to the eager path's bits, also with a tensor lr; a (0, 5) matrix is a no-op, as in
    # AdamW, and never reaches the kernel (which needs 1 <= k <= numel).
    calls = []
    fused = mofo_kernel.moments_threshold_c
    monkeypatch.setattr(mofo_kernel, "moments_threshold_c",
                        lambda g, m, *a: calls.append(m.numel()) or fused(g, m, *a))
    runs = []
    for compiled in (False, True):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(300, 200, dtype=torch.complex64, generator=gen)),
                  torch.nn.Parameter(torch.zeros(0, 5))]
        opt = MoFO(params, lr=torch.tensor([1e-2]), alpha=0.1, weight_decay=0.1, compiled=compiled)
        for step in range(3):
            g = torch.Generator().manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, dtype=p.dtype, generator=g)
            opt.step()
        runs.append((params[0], opt.last_update_fraction))
    (eager, eager_fraction), (compiled, compiled_fraction) = runs
    assert torch.equal(as_bits(torch.view_as_real(eager)), as_bits(torch.view_as_real(compiled)))
    assert eager_fraction == compiled_fraction == 12000 / 120000
    assert calls == [120000] * 3


def test_an_edited_kernel_is_rebuilt_and_a_missing_compiler_is_said(monkeypatch, tmp_path):
    monkeypatch.setattr(mofo_kernel.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(mofo_kernel, "SOURCE", mofo_kernel.SOURCE + "\n/* edited */\n")
    mofo_kernel.library.cache_clear()
    try:
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
        with pytest.raises(RuntimeError, match="C compiler"):
            mofo_kernel.library()
        monkeypatch.delenv("CC")
        lib = mofo_kernel.library()
        assert str(tmp_path) in lib._name  # built anew for the edited source, not served stale
    finally:
        mofo_kernel.library.cache_clear()



# ----- The fused step (mofo_fast.fused_step_): each pass against torch's own ops, then the whole
# optimizer against mofo.MoFO. Sizes not multiples of 8, 16 or 32 put entries in the scalar tails
# of torch's vectorized loops (and of its threads' parts); torch's rounding must hold there too.

SIZES = [1, 2, 7, 8, 9, 15, 16, 17, 31, 33, 63, 65, 255, 257, 4095, 4097, 32767, 32769,
         4 * mofo_fast.SAMPLE_SIZE + 1, 100003]


def moments_eager(g, m, v, beta1, beta2, maximize):
    g = -g if maximize else g
    return m.clone().lerp_(g, 1 - beta1), v.clone().mul_(beta2).addcmul_(g, g, value=1 - beta2)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("beta1,beta2,maximize", [(0.9, 0.999, False), (0.3, 0.95, True)])
def test_fused_moments_are_torchs_bit_for_bit(threads, beta1, beta2, maximize):
    # beta1 = 0.3: lerp's weight 0.7 >= 0.5 takes ATen's other formula, fma(w - 1, g - m, g)
    torch.set_num_threads(threads)
    try:
        for n in SIZES:
            gen = torch.Generator().manual_seed(n)
            g = torch.randn(n, generator=gen) * 10.0 ** torch.randint(-6, 2, (n,), generator=gen)
            m, v = torch.randn(n, generator=gen) * 1e-2, torch.rand(n, generator=gen) * 1e-3
            m_ref, v_ref = moments_eager(g, m, v, beta1, beta2, maximize)
            k = max(1, n // 10)
            found = mofo_kernel.moments_threshold_c(g, m, v, k, -1.0 if maximize else 1.0,
                                                    1 - beta1, beta2, 1 - beta2,
                                                    mofo_fast.SAMPLE_SIZE, mofo_fast.SAMPLE_Z,
                                                    torch.empty(n))
            assert torch.equal(as_bits(m), as_bits(m_ref)), n
            assert torch.equal(as_bits(v), as_bits(v_ref)), n
            tau = torch.topk(m.abs(), k).values[-1]
            assert found == (tau.item(), int((m.abs() >= tau).sum())), n
    finally:
        torch.set_num_threads(2)


def masked_step_eager(p, m, v, tau, lr, weight_decay, c, eps, step_size):
    """mofo_update_'s steps 1, 3 and 5 as it runs them, with select_reference's m * mask."""
    p = p.clone()
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    denom = torch.sqrt(v).div_(c).add_(eps)
    return p.addcdiv_(m * (m.abs() >= tau), denom, value=-step_size)


@pytest.mark.parametrize("threads", [1, 2])
def test_fused_masked_step_is_torchs_bit_for_bit(threads):
    torch.set_num_threads(threads)
    try:
        for n in SIZES + [4 * 4096 + 3]:
            gen = torch.Generator().manual_seed(n)
            p = torch.randn(n, generator=gen)
            m = torch.randn(n, generator=gen) * 10.0 ** torch.randint(-8, 0, (n,), generator=gen)
            v = torch.rand(n, generator=gen) * 10.0 ** torch.randint(-30, 2, (n,), generator=gen)
            # zeros of both signs (a dropped entry adds a zero: -0 + +0 is +0), an infinite m
            # (m * 0 is NaN), v = 0 (0 / 0 where eps = 0) and v = inf (x / inf = 0)
            for i, value in ((0, 0.0), (3, -0.0), (5, -0.0), (6, 0.0)):
                if i < n:
                    p[i] = value
            special = ((1, "m", math.inf), (2, "v", 0.0), (4, "v", math.inf), (6, "v", 0.0))
            for i, name, value in special:
                if i < n:
                    (m if name == "m" else v)[i] = value
            tau = float(torch.topk(m.abs(), max(1, n // 10)).values[-1])
            hypers = ((1e-3, 0.0, 1e-8), (torch.tensor(3e-2), 0.1, 0.0), (0.5, 0.01, 1e-3))
            for lr, wd, eps in hypers:
                c, step_size = (1 - 0.999 ** 3) ** 0.5, lr / (1 - 0.9 ** 3)
                ref = masked_step_eager(p, m, v, tau, lr, wd, c, eps, step_size)
                q = p.clone()
                decay = float(1 - lr * wd) if wd != 0 else None
                mofo_kernel.masked_step_c(q, m, v, tau, decay, c, eps, -float(step_size))
                assert torch.equal(as_bits(q), as_bits(ref)), (n, lr, wd, eps)
    finally:
        torch.set_num_threads(2)


def fused_step_calls(monkeypatch):
    calls = []
    fused = mofo_kernel.moments_threshold_c
    monkeypatch.setattr(mofo_kernel, "moments_threshold_c",
                        lambda g, m, *a: calls.append(m.numel()) or fused(g, m, *a))
    return calls


def train_side_by_side(steps=6, lr=1e-2, seed=0, **kwargs):
    """The same parameters and gradients stepped by mofo.MoFO and mofo_fast.MoFO(compiled=True):
    a matrix above 4 * SAMPLE_SIZE entries (sampled), odd-sized ones below, a vector (dense)."""
    shapes = [(257, 263), (37, 41), (1, 5), (3, 3), (129,)]
    runs = []
    for optimizer in (mofo.MoFO, partial_compiled):
        gen = torch.Generator().manual_seed(seed)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        params[1].data[:2] = 0.0  # parameters at +0 and -0: the dropped entries' zeros show
        params[1].data[2:4] = -0.0
        opt = optimizer(params, lr=lr, **kwargs)
        fractions = []
        for step in range(steps):
            g = torch.Generator().manual_seed(100 + step)
            for p in params:
                scale = 10.0 ** torch.randint(-4, 1, p.shape, generator=g)
                p.grad = torch.randn(p.shape, generator=g) * scale
                if step == 2:
                    p.grad[..., :3] = 0.0  # equal |m| among the smallest
            opt.step()
            fractions.append(opt.last_update_fraction)
        runs.append((params, opt, fractions))
    return runs


def partial_compiled(params, **kwargs):
    return MoFO(params, compiled=True, **kwargs)


@pytest.mark.parametrize("kwargs", [dict(alpha=0.1), dict(alpha=0.01, weight_decay=0.1),
                                    dict(alpha=0.5, weight_decay=0.01, betas=(0.3, 0.95)),
                                    dict(alpha=0.1, maximize=True, eps=0.0),
                                    dict(alpha=0.2, lr=torch.tensor([3e-2]), weight_decay=0.05)],
                         ids=["alpha=0.1", "alpha=0.01,wd", "alpha=0.5,beta1=0.3", "maximize,eps=0",
                              "tensor lr"])
def test_compiled_optimizer_is_mofo_py_bit_for_bit(kwargs, monkeypatch):
    calls = fused_step_calls(monkeypatch)
    (ref, ref_opt, ref_fractions), (fast, fast_opt, fast_fractions) = train_side_by_side(**kwargs)
    for p, q in zip(ref, fast):
        assert torch.equal(as_bits(p), as_bits(q)), p.shape
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(as_bits(ref_opt.state[p][key]), as_bits(fast_opt.state[q][key]))
    assert ref_fractions == fast_fractions
    assert calls == [257 * 263, 37 * 41, 5, 9] * 6  # every matrix took the fused step


def test_a_kernel_without_torchs_fma_is_caught(monkeypatch, tmp_path):
    # The deliberate break: addcmul's fma written as a product and a sum (one more rounding). The
    # check at first use must see it, and MoFO(compiled=True) must then keep to mofo.MoFO's bits.
    fma = "v[i + e] = fmaf(w2 * gi, gi, v[i + e] * b2);"
    assert fma in mofo_kernel.SOURCE
    monkeypatch.setattr(mofo_kernel.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(mofo_kernel, "SOURCE", mofo_kernel.SOURCE.replace(
        fma, "v[i + e] = w2 * gi * gi + v[i + e] * b2;"))
    mofo_kernel.library.cache_clear()
    mofo_fast.fused_matches_torch.cache_clear()
    try:
        with pytest.warns(UserWarning, match="steps 4-5 in C only"):
            assert not mofo_fast.fused_matches_torch()
        calls = fused_step_calls(monkeypatch)
        (ref, *_), (fast, *_) = train_side_by_side(steps=3, alpha=0.1)
        # the steps-4-5 path's dropped entries add +0, not m * 0: equal numbers, a parameter at
        # -0.0 may end at -0.0 instead of +0.0 (as mofo_fast's eager path, test_apply_c_...)
        assert calls == [] and all(torch.equal(p, q) for p, q in zip(ref, fast))
    finally:
        mofo_kernel.library.cache_clear()
        mofo_fast.fused_matches_torch.cache_clear()


def test_the_fused_step_takes_a_nan_as_torch_topk_does():
    # a NaN |m| ranks first in torch.topk: the kernel says so and torch selects; same bits
    runs = []
    for optimizer in (mofo.MoFO, partial_compiled):
        gen = torch.Generator().manual_seed(5)
        p = torch.nn.Parameter(torch.randn(300, 250, generator=gen))
        p.grad = torch.randn(300, 250, generator=gen)
        p.grad[7, 9] = math.nan
        optimizer([p], lr=1e-2, alpha=0.1).step()
        runs.append(p)
    assert torch.equal(as_bits(runs[0]), as_bits(runs[1]))
