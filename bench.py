"""
Speed comparisons, measured side by side in one run, against what users run.

    python bench.py                  # every section, on the best device available
    python bench.py --only mofo      # one section: mofo | hft | loop
    python bench.py --device cpu --threads 2
    python bench.py --quick          # tiny shapes, one round: checks that it runs (the tests)

Each section times its contenders in interleaved rounds (A, B, C, A, B, C, ...) and reports
medians, so background load hits all of them alike: compare ratios, not raw times. Beside the
wall time stands this process's CPU time, which other programs disturb far less.

mofo: one optimizer step on the bench model (a Llama-shaped decoder, 13 M parameters) and on one
Llama-7B decoder layer (202 M parameters; --shapes). Contenders: torch's AdamW (foreach=False,
foreach=True, fused=True where this torch runs it), mofo.MoFO (the readable reference: a full
torch.topk per tensor), mofo_fast.MoFO and, with a C compiler, mofo_fast.MoFO(compiled=True). The
yardstick "/ fused" is AdamW(fused=True), what a user picks (the fastest AdamW where it does not
run); "/ foreach=False" is the single-tensor AdamW whose operations MoFO's follow. All MoFOs
compute bitwise the same step. hft: one training step of HFT against full fine-tuning, and
AdamW's state. loop: ms per iteration of train_tiny's loop on nanoGPT's CPU recipe
shapes, full fine-tuning and MoFO, against the same loop driving nanoGPT's GPT-2 (GPT2 below) and
our model with LayerNorm for RMSNorm; --compile adds the torch.compile'd models.
"""
import argparse
import gc
import math
import platform
import resource
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

import loop
import mofo
import mofo_fast


def get_device(name):  # train_tiny's choice (loop.pick_device), as a torch.device
    return torch.device(loop.pick_device(name))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns, device, rounds, warmup=2, before_round=None, before_call=None):
    """(wall, cpu): median milliseconds per call of each fn in the dict, called in interleaved
    rounds after `warmup` untimed ones. before_round() and before_call(name) run untimed."""
    wall, cpu = {name: [] for name in fns}, {name: [] for name in fns}
    for r in range(warmup + rounds):
        if before_round is not None:
            before_round()
        for name, fn in fns.items():
            if before_call is not None:
                before_call(name)
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            if r >= warmup:
                wall[name].append((time.perf_counter() - t0) * 1e3)
                cpu[name].append((time.process_time() - c0) * 1e3)
    return ({name: statistics.median(ts) for name, ts in wall.items()},
            {name: statistics.median(ts) for name, ts in cpu.items()})


def meminfo(key):
    """A /proc/meminfo entry in bytes ("MemTotal", "MemAvailable"), or None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":")),
                        None)
    except OSError:
        return None


def machine_description(device):
    """One line naming the machine (loop.machine's, with the RAM and GPU) for the speed tables."""
    m, ram = loop.machine(), meminfo("MemTotal")
    line = (f"machine: {m['cpu']} ({m['capability']}), {m['cores']} logical CPUs"
            + (f", {ram / 2**30:.0f} GiB RAM" if ram else "")
            + f", {platform.system()}, torch {m['torch']}, {m['threads']} threads")
    if device.type == "cuda":
        line += f", GPU {torch.cuda.get_device_name(device)}"
    return line


def llama_layer_shapes(n_embd, n_hidden):
    """Parameter shapes of one Llama decoder layer: attention, gated MLP, their RMSNorms."""
    return ([(n_embd,)] + [(n_embd, n_embd)] * 4  # norm, q, k, v, o
            + [(n_embd,), (n_hidden, n_embd), (n_hidden, n_embd), (n_embd, n_hidden)])  # norm, gate, up, down


def llama_shapes(n_layer, n_embd, n_hidden, vocab_size):
    """Parameter shapes of a Llama-style decoder: embeddings, n_layer layers, final norm, head."""
    return ([(vocab_size, n_embd)] + llama_layer_shapes(n_embd, n_hidden) * n_layer
            + [(n_embd,), (vocab_size, n_embd)])


# -----------------------------------------------------------------------------
# mofo: one optimizer step of torch's AdamWs, MoFO's readable reference and MoFO

def fused_adamw_problem(device):
    """None if this torch's fused AdamW steps on `device`, else the reason it does not."""
    p = torch.zeros(2, device=device, requires_grad=True)
    p.grad = torch.zeros(2, device=device)
    try:
        torch.optim.AdamW([p], fused=True).step()
    except (RuntimeError, ValueError, NotImplementedError) as e:
        return str(e).strip().splitlines()[0]
    return None


def optimizer_contenders(device, alpha):
    """name -> (params -> optimizer), all with lr=1e-4 and no weight decay: the same arithmetic."""
    adamw = partial(torch.optim.AdamW, lr=1e-4, weight_decay=0.0)
    contenders = {"AdamW (foreach=False)": partial(adamw, foreach=False),
                  "AdamW (foreach=True)": partial(adamw, foreach=True)}
    problem = fused_adamw_problem(device)
    if problem is None:
        contenders["AdamW (fused=True)"] = partial(adamw, fused=True)
    else:
        print(f"  AdamW (fused=True) skipped: torch {torch.__version__} does not run it on {device.type}: {problem}")
    contenders["MoFO reference (topk)"] = partial(mofo.MoFO, lr=1e-4, alpha=alpha)
    contenders[f"MoFO (alpha={alpha})"] = partial(mofo_fast.MoFO, lr=1e-4, alpha=alpha)
    problem = compiled_problem(device)
    if problem is None:
        contenders["MoFO (compiled=True)"] = partial(mofo_fast.MoFO, lr=1e-4, alpha=alpha,
                                                     compiled=True)
    else:
        print(f"  MoFO (compiled=True) skipped: {problem}")
    return contenders


def compiled_problem(device):
    """None if MoFO(compiled=True) runs its C kernel here, else why not (it is CPU-only)."""
    if device.type != "cpu":
        return f"its C kernel runs on the CPU, not {device.type}"
    try:
        import mofo_kernel
        mofo_kernel.library()
    except (ImportError, RuntimeError, OSError) as e:
        return str(e).strip().splitlines()[0]
    return None


def bench_optimizers(title, shapes, contenders, device, rounds, warmup):
    """Print one table: each contender's step on `shapes`; returns its median wall ms."""
    # One parameter and gradient set serves every contender, one optimizer alive at a time (made
    # anew, its first step untimed): the memory of a single AdamW run (3.2 GB for the 7B layer,
    # against 16 GB for six contenders with their own), and interleaved rounds all the same.
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    live = {}

    def make(name):
        live.clear()
        gc.collect()  # torch's AdamW sits in a reference cycle: free its state before the next one's
        live["optimizer"] = contenders[name](params)
        live["optimizer"].step()

    def fresh_gradients():  # new random gradients each round, the same for every contender
        for p in params:
            p.grad.normal_()

    steps = {name: lambda: live["optimizer"].step() for name in contenders}
    ms, cpu = time_interleaved(steps, device, rounds, warmup, before_round=fresh_gradients, before_call=make)
    live.clear()
    n_params = sum(p.numel() for p in params)
    print(f"  {title}: {n_params / 1e6:.1f} M parameters in {len(shapes)} tensors, "
          f"median of {rounds} interleaved rounds")
    yardstick = yardstick_of(ms)
    column = "/ fused" if "fused" in yardstick else "/ fastest"
    print(f"  {'':26s} {'wall ms':>9s} {'CPU ms':>9s} {column:>9s} {'/ foreach=False':>16s}")
    base, single = ms[yardstick], ms["AdamW (foreach=False)"]
    for name in contenders:
        print(f"  {name:26s} {ms[name]:9.1f} {cpu[name]:9.1f} {ms[name] / base:9.2f} "
              f"{ms[name] / single:16.2f}")
    return ms


def yardstick_of(ms):
    """The AdamW the tables divide by: fused=True where this torch runs it on the device (what a
    user picks there: it reads g, m, v, p and writes m, v, p once), else the faster of the
    others."""
    if "AdamW (fused=True)" in ms:
        return "AdamW (fused=True)"
    return min(("AdamW (foreach=False)", "AdamW (foreach=True)"), key=ms.get)


def print_targets(ms, alpha):
    """The fast path's targets: within 2x the yardstick where a C compiler runs its step
    (compiled=True), within 4x without one (the eager fast path)."""
    yardstick = yardstick_of(ms)
    mofo, reference = ms[f"MoFO (alpha={alpha})"], ms["MoFO reference (topk)"]
    print(f"  targets: MoFO / AdamW(foreach=False) {mofo / ms['AdamW (foreach=False)']:.2f}, "
          f"reference / MoFO {reference / mofo:.2f} (>= 2), "
          f"MoFO / {yardstick} {mofo / ms[yardstick]:.2f} (<= 4, without a C compiler)")
    if "MoFO (compiled=True)" in ms:
        print(f"           MoFO(compiled=True) / {yardstick} "
              f"{ms['MoFO (compiled=True)'] / ms[yardstick]:.2f} (<= 2.0, with a C compiler)")


def bench_mofo(args):
    device = get_device(args.device)
    print(f"mofo: one optimizer step with random gradients, {device}, {torch.get_num_threads()} threads")
    contenders = optimizer_contenders(device, args.alpha)
    if args.shapes in ("bench", "both"):
        ms = bench_optimizers(f"bench model (n_layer={args.n_layer}, n_embd={args.n_embd}, n_hidden={args.n_hidden}, "
                              f"vocab_size={args.vocab_size})",
                              llama_shapes(args.n_layer, args.n_embd, args.n_hidden, args.vocab_size),
                              contenders, device, args.rounds, args.warmup)
        print_targets(ms, args.alpha)
    if args.shapes in ("llama7b-layer", "both"):
        shapes = llama_layer_shapes(args.layer_embd, args.layer_hidden)
        # parameters, gradients, two moments and temporaries: 6 fp32 copies (5.8 measured)
        need = 6 * 4 * sum(math.prod(s) for s in shapes)
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else meminfo("MemAvailable")
        title = f"Llama-7B layer (n_embd={args.layer_embd}, n_hidden={args.layer_hidden})"
        if free is not None and need > 0.6 * free:
            print(f"  {title} skipped: needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
            return
        # its steps take seconds on a CPU: fewer rounds (--rounds_7b) and at most one warm-up round
        print_targets(bench_optimizers(title, shapes, contenders, device, args.rounds_7b,
                                       min(args.warmup, 1)), args.alpha)
        peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"  # bytes
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # KiB on Linux
        kind = "GPU allocations" if device.type == "cuda" else "RSS"
        print(f"  peak memory of this process: {peak / 2**30:.1f} GiB ({kind}; "
              f"estimate {need / 2**30:.1f} GiB)")


# -----------------------------------------------------------------------------
# hft: HFT step vs full fine-tuning step

def bench_hft(args):
    """HFT vs full fine-tuning: one training step (forward, backward, AdamW step) on the same
    Llama-shaped model and batch, plus the size of AdamW's state."""
    import hft  # imported here so that the other sections run without these modules
    from model import ModelConfig, TinyLlama

    device = get_device(args.device)
    batch_size, block_size = 8, 64  # a small fine-tuning batch: 512 tokens per step
    torch.manual_seed(0)
    config = ModelConfig(n_layer=args.n_layer, n_head=max(1, args.n_embd // 64), n_embd=args.n_embd,
                         block_size=block_size, vocab_size=args.vocab_size)
    models = {"full": TinyLlama(config).to(device), "hft": TinyLlama(config).to(device)}
    models["hft"].load_state_dict(models["full"].state_dict())  # same starting weights
    trainable = hft.select(models["hft"], seed=0)
    params = {"full": list(models["full"].parameters()), "hft": hft.apply(models["hft"], trainable)}
    optimizers = {name: torch.optim.AdamW(params[name], lr=1e-4, weight_decay=0.1) for name in models}
    idx = torch.randint(0, config.vocab_size, (batch_size, block_size), device=device)  # (B, T)
    targets = torch.randint(0, config.vocab_size, (batch_size, block_size), device=device)  # (B, T)

    def make_step(name):
        model, optimizer = models[name], optimizers[name]

        def step():
            _, loss = model(idx, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # frozen matrices: input gradient only, no weight gradient
            optimizer.step()  # frozen matrices: no state, no update
        return step

    # One thread: on a shared, busy CPU a two-thread step waits for its slower thread, and that
    # noise swamps the difference measured here; the work HFT skips is the same.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ms, cpu = time_interleaved({name: make_step(name) for name in models}, device, args.rounds,
                                   args.warmup)
    finally:
        torch.set_num_threads(threads)

    state = {name: sum(t.numel() * t.element_size() for st in opt.state.values()  # m, v, step
                       for t in st.values() if torch.is_tensor(t)) for name, opt in optimizers.items()}
    # matmul FLOPs: forward and input gradient alike; no weight gradient for frozen matrices (the
    # attention scores, norms and loss, the same for both, pull the measured ratio toward 1)
    weights = [m.weight for m in models["hft"].modules() if isinstance(m, torch.nn.Linear)]
    all_mm = sum(w.numel() for w in weights)
    trained_mm = sum(w.numel() for w in weights if w.requires_grad)
    mm_ratio = (2 * all_mm + trained_mm) / (3 * all_mm)

    r = hft.summary(models["hft"], trainable)
    n_params = sum(p.numel() for p in models["full"].parameters())
    print(f"hft: one training step (forward + backward + AdamW step), {n_params / 1e6:.1f} M parameters "
          f"(n_layer={config.n_layer}, n_embd={config.n_embd}, vocab_size={config.vocab_size}), "
          f"batch {batch_size} x {block_size} tokens, {device}, 1 thread, "
          f"median of {args.rounds} interleaved rounds")
    print(f"  trainable with HFT: {r['fraction']:.1%} of all parameters, {r['block_fraction']:.1%} of the blocks "
          f"(attn {r['by_category']['attn']['fraction']:.0%}, mlp {r['by_category']['mlp']['fraction']:.0%}, "
          f"norm {r['by_category']['norm']['fraction']:.0%}, outside the blocks "
          f"{r['by_category']['other']['fraction']:.0%})")
    print(f"  {'':22s} {'full':>9s} {'HFT':>9s} {'HFT/full':>9s}")
    print(f"  {'step ms':22s} {ms['full']:9.1f} {ms['hft']:9.1f} {ms['hft'] / ms['full']:9.2f}   (target <= 0.85)")
    print(f"  {'step CPU ms':22s} {cpu['full']:9.1f} {cpu['hft']:9.1f} {cpu['hft'] / cpu['full']:9.2f}   "
          f"(CPU time of this process)")
    print(f"  {'AdamW state MB':22s} {state['full'] / 2**20:9.1f} {state['hft'] / 2**20:9.1f} "
          f"{state['hft'] / state['full']:9.2f}   (target <= 0.55)")
    print(f"  {'matmul-only estimate':22s} {'':9s} {'':9s} {mm_ratio:9.2f}   (forward + backward matmul FLOPs only)")


# -----------------------------------------------------------------------------
# loop: training loop ms/iter

class GPT2(nn.Module):
    """nanoGPT's architecture (GPT-2 blocks; bias=False, dropout 0 as its CPU recipe), the loop's
    yardstick: LayerNorm (one kernel forward, one backward), learned positions, one qkv matrix, a
    GELU MLP of width 4·C and the head tied to the embedding. Forward (idx, targets) -> (logits, loss)."""

    def __init__(self, vocab_size, n_layer, n_head, n_embd, block_size):
        super().__init__()
        self.n_head = n_head
        self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList(nn.ModuleDict(dict(
            ln_1=nn.LayerNorm(n_embd, bias=False), c_attn=nn.Linear(n_embd, 3 * n_embd, bias=False),
            attn_proj=nn.Linear(n_embd, n_embd, bias=False), ln_2=nn.LayerNorm(n_embd, bias=False),
            c_fc=nn.Linear(n_embd, 4 * n_embd, bias=False), mlp_proj=nn.Linear(4 * n_embd, n_embd, bias=False)))
            for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=False)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as GPT-2

    def forward(self, idx, targets):
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for b in self.h:
            q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in b.c_attn(b.ln_1(x)).chunk(3, dim=-1))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + b.attn_proj(y.transpose(1, 2).reshape(B, T, -1))
            x = x + b.mlp_proj(F.gelu(b.c_fc(b.ln_2(x))))
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)


def bench_loop(args):
    """ms per iteration of train_tiny's loop (batch, forward, backward, clip, step) on nanoGPT's CPU
    recipe shapes (4 layers, 4 heads, 128 channels, context 64, batch 12), the rest train_tiny's
    default Config and METHODS table; "/ GPT-2": the same loop driving nanoGPT's architecture."""
    import random
    from contextlib import nullcontext

    import data  # imported here so that the other sections run without them
    import train_tiny as tt

    device = get_device(args.device)
    ctx = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()
    corpus = data.build_corpus()

    def make_loop(method, arch="llama", compile=False):  # arch: llama | layernorm (llama's norms so) | gpt2
        cfg = tt.Config(method=method, alpha=args.alpha, max_iters=args.iters, n_layer=4, n_head=4,
                        n_embd=128, block_size=64, batch_size=12, compile=compile)
        torch.manual_seed(0)
        if arch == "gpt2":
            model = GPT2(len(data.VOCAB), cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size).to(device)
        else:
            model = tt.TinyLlama(tt.model_config(cfg)).to(device)
            for owner in (*model.model.layers, model.model) if arch == "layernorm" else ():
                for name, child in owner.named_children():  # RMSNorm -> LayerNorm, same width, no bias
                    if isinstance(child, nn.RMSNorm):
                        setattr(owner, name, nn.LayerNorm(cfg.n_embd, bias=False).to(device))
        params, _ = tt.METHODS[method].params(model, cfg, 0)  # stage (task) 0
        optimizer = tt.METHODS[method].optimizer(params, cfg)
        if compile and method == "mofo" and compiled_problem(device) is None:  # its step in C
            optimizer = mofo_fast.MoFO(params, **{k: optimizer.defaults[k] for k in mofo.MOFO_KEYS},
                                       compiled=True)
        rng = random.Random(0)
        fwd = loop.wrap(model, cfg.compile, world=1)  # torch.compile'd where asked, as train_tiny does
        params = [p for p in model.parameters() if p.requires_grad]

        def run_iters():  # train_tiny's loop body, max_iters iterations (the schedule restarts each call)
            for it in range(cfg.max_iters):
                for group in optimizer.param_groups:
                    group["lr"] = loop.get_lr(it, cfg.lr, cfg.warmup_iters, cfg.max_iters)
                x, y = data.text_windows(corpus.train, cfg.block_size, cfg.batch_size, rng)
                with ctx:
                    loss = fwd(x.to(device), y.to(device))[1]
                loop.train_step(optimizer, loss, params, cfg.grad_clip, "bench")
        return run_iters

    yardstick = "GPT-2 (nanoGPT's architecture)"
    loops = {yardstick: make_loop("full", "gpt2"), "full (AdamW)": make_loop("full"),
             "full, LayerNorm for RMSNorm": make_loop("full", "layernorm"),
             f"mofo (alpha={args.alpha})": make_loop("mofo")}
    if args.compile:  # the first calls compile (tens of seconds on a CPU): the warm-up rounds take them
        loops["GPT-2, --compile"] = make_loop("full", "gpt2", compile=True)
        loops["full, --compile"] = make_loop("full", compile=True)
        loops["mofo, --compile, compiled=True"] = make_loop("mofo", compile=True)
    ms, cpu = time_interleaved(loops, device, args.rounds, args.warmup)
    print(f"loop: train_tiny's training loop on nanoGPT's CPU shapes (4x128, 4 heads, context 64, batch 12), "
          f"{device.type}, {torch.get_num_threads()} threads, median of {args.rounds} rounds of {args.iters} iters")
    print(f"  {'':32s} {'ms/iter':>9s} {'CPU ms/iter':>12s} {'/ GPT-2':>8s}")
    for name in loops:
        print(f"  {name:32s} {ms[name] / args.iters:9.1f} {cpu[name] / args.iters:12.1f} {ms[name] / ms[yardstick]:8.2f}")


# -----------------------------------------------------------------------------

SECTIONS = {"mofo": bench_mofo, "hft": bench_hft, "loop": bench_loop}
# --quick: every code path on tiny shapes with one round, for the tests; its numbers mean nothing
QUICK = dict(n_layer=1, n_embd=64, n_hidden=172, vocab_size=64, layer_embd=64, layer_hidden=172,
             rounds=1, rounds_7b=1, warmup=0, iters=2)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=list(SECTIONS), default=None, help="run one section (default: all)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds per contender")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one round: runs every path, in seconds")
    parser.add_argument("--alpha", type=float, default=0.1, help="MoFO's fraction of each tensor updated")
    parser.add_argument("--shapes", choices=["bench", "llama7b-layer", "both"], default="both",
                        help="mofo section: the bench model, one Llama-7B layer, or both")
    parser.add_argument("--rounds_7b", type=int, default=5, help="timed rounds on the Llama-7B layer")
    parser.add_argument("--n_layer", type=int, default=4, help="bench model")
    parser.add_argument("--n_embd", type=int, default=512, help="bench model")
    parser.add_argument("--n_hidden", type=int, default=1376, help="bench model: gated MLP width")
    parser.add_argument("--vocab_size", type=int, default=512, help="bench model")
    parser.add_argument("--layer_embd", type=int, default=4096, help="Llama-7B layer: channels")
    parser.add_argument("--layer_hidden", type=int, default=11008, help="Llama-7B layer: gated MLP width")
    parser.add_argument("--iters", type=int, default=10, help="loop: iterations per timed call")
    parser.add_argument("--compile", action="store_true", help="loop: also with torch.compile (train_tiny "
                        "--compile) and MoFO(compiled=True); the warm-up rounds take the compilation")
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(machine_description(get_device(args.device)))
    for name, bench in SECTIONS.items():
        if args.only in (None, name):
            bench(args)


if __name__ == "__main__":
    main()
