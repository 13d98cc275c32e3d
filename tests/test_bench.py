"""Tests for bench.py: every section runs on tiny shapes (--quick) and prints its rows. Nothing
here reads a timing: a benchmark must never pass or fail on speed."""

import math
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
import bench


def test_llama_shapes_count_llama_7b():
    """The shapes are Llama's: one layer of Llama-7B has 202,383,360 parameters, and 32 of them
    with the embeddings, final norm and head of a 32000-token vocabulary are Llama-2-7B's 6.74 B."""
    count = lambda shapes: sum(math.prod(s) for s in shapes)
    assert count(bench.llama_layer_shapes(4096, 11008)) == 202_383_360
    assert count(bench.llama_shapes(32, 4096, 11008, 32000)) == 6_738_415_616


def test_gpt2_yardstick_has_nanogpts_parameters():
    """The loop's yardstick has nanoGPT's shapes at its CPU recipe (65 characters, 4 layers of 128,
    context 64): 12·L·C² in the blocks, the tied embedding/head V·C, positions T·C and 2L+1
    LayerNorm weights C = 804,096 (nanoGPT prints 0.80M, positions left out); and it trains."""
    torch.manual_seed(0)
    model = bench.GPT2(65, 4, 4, 128, 64)
    assert sum(p.numel() for p in model.parameters()) == 12 * 4 * 128**2 + 65 * 128 + 64 * 128 + 9 * 128
    assert model.lm_head.weight is model.wte.weight
    idx = torch.randint(65, (2, 64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):  # one batch, learned by heart: the loss must fall
        logits, loss = model(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert logits.shape == (2, 63, 65) and losses[-1] < 0.5 * losses[0]


def test_quick_runs_every_section(capsys):
    threads = torch.get_num_threads()
    try:
        bench.main(["--quick", "--device", "cpu", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert out.startswith("machine: ") and "torch " + torch.__version__ in out.splitlines()[0]
    # mofo: the bench model's table and the Llama-7B layer's, each with every contender
    assert "bench model (n_layer=1" in out and "Llama-7B layer (n_embd=64, n_hidden=172)" in out
    fused = "AdamW (fused=True) skipped" not in out
    for row in ["AdamW (foreach=False)", "AdamW (foreach=True)", "MoFO reference (topk)", "MoFO (alpha=0.1)"] + \
               ["AdamW (fused=True)"] * fused:
        assert sum(line.startswith("  " + row + " ") for line in out.splitlines()) == 2, row
    assert "targets: MoFO / AdamW(foreach=False)" in out and "peak memory of this process" in out
    # hft and loop
    for row in ["hft: one training step", "  step ms",
                "  step CPU ms", "  AdamW state MB", "  matmul-only estimate",
                "loop: train_tiny's training loop", "  GPT-2 (nanoGPT's architecture)", "  full (AdamW)",
                "  full, LayerNorm for RMSNorm", "  mofo (alpha=0.1)"]:
        assert row in out, row
    numbers = "\n".join(out.splitlines()[1:])  # the machine line is free text
    assert not re.search(r"\b(nan|inf)\b", numbers)


def test_layer_too_large_for_memory_is_skipped(capsys):
    """The Llama-7B layer is skipped, with a note, when it would not fit in well under the free
    memory, before anything is allocated: here a layer of 65536 channels (about 670 GiB)."""
    if bench.meminfo("MemAvailable") is None:  # no /proc/meminfo: the guard cannot know
        pytest.skip("no /proc/meminfo on this system")
    args = bench.parse_args(["--quick", "--device", "cpu", "--shapes", "llama7b-layer"])
    args.layer_embd = args.layer_hidden = 65536
    bench.bench_mofo(args)
    out = capsys.readouterr().out
    assert "Llama-7B layer (n_embd=65536, n_hidden=65536) skipped: needs about" in out
    assert "AdamW (foreach=False) " not in out  # no table
