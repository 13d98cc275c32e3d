"""The built-in corpus and the fine-tuning tasks of the tiny forgetting experiment.

An invented world (people with a city, a job, a pet and a colour) is stated in several sentence
templates, so that its facts are learned as knowledge, not as one string; narrative sentences from a
small grammar carry "general language", and sentences never used in pre-training measure it. The
fine-tuning tasks are new skills with exact answers. Everything is generated from a seed: no download,
and the same generator with a smaller world gives tests a corpus that trains in seconds.

Two versions of the corpus (same people, same facts, same probes). `v1`, the first one, never shows a
digit, '+', ':' or '=', so fine-tuning had to grow new token embeddings. `v2` (the default) lets the
task be read, as an LLM reads math before it is fine-tuned on it: the narrative writes numbers in
their everyday roles (counts, ages, house numbers, years, clock times) and a small share `arith` of
sentences state one-digit sums in prose ("The clever owl knows that 3+4=7."), never a 2-digit
operand nor the task's bare line; the sums stated are kept out of the test problems (`stated`).

The end of the file scores a model on them: knowledge by multiple choice and greedy recall, a task
by exact match and answer loss, general language by the loss on held-out text. Kept apart from
train_tiny.py as nanoGPT keeps its data preparation apart from its model and loop:
a reader changing the world or a task reads this file only.
"""
import functools
import random
import re
import string
from dataclasses import dataclass

import torch

TASKS = ("add", "reverse", "sort", "count")

VOCAB = "\n +.:=" + string.digits + string.ascii_lowercase + string.ascii_uppercase
STOI = {ch: i for i, ch in enumerate(VOCAB)}
ATTRIBUTES = {  # attribute: (candidate values, templates); the first template is the probe
    "city": (("Brask", "Corvel", "Dunmere", "Elstow", "Farrow", "Glenhal", "Harlow", "Istra",
              "Jorvik", "Kelda", "Lunmar", "Mirren"),
             ("{} lives in {}.", "The home of {} is {}.", "{} has a house in {}.")),
    "job": (("baker", "pilot", "farmer", "doctor", "tailor", "painter", "sailor", "miner", "potter", "teacher"),
            ("{} works as a {}.", "The job of {} is {}.", "{} earns a living as a {}.")),
    "pet": (("cat", "dog", "parrot", "rabbit", "turtle", "goat", "hamster", "lizard"),
            ("{} has a pet {}.", "The pet of {} is a {}.", "{} feeds a {} every day.")),
    "colour": (("red", "blue", "green", "yellow", "purple", "orange", "white", "black"),
               ("{} likes the colour {}.", "The favourite colour of {} is {}.", "{} paints everything {}.")),
}
FILLER = (("old", "small", "quiet", "happy", "brave", "tired", "clever", "young"),
          ("horse", "fox", "crow", "mouse", "bear", "wolf", "owl", "deer"),
          ("walks to", "runs past", "sleeps near", "looks at", "waits by", "sings to"),
          ("the river", "the hill", "the market", "the bridge", "the forest", "the tower", "the well", "the gate"))
NARRATIVE = (  # v2: v1's sentence, and numbers in the roles they play in ordinary text
    "The {a} {b} {c} {d}.", "The {a} {b} sees {n} {things} by {d}.", "The {a} {b} is {n} years old.",
    "The {a} {b} lives at number {n}.", "In {year} the {a} {b} came to {d}.", "The clock by {d} shows {time}.")
THINGS = ("apples", "boats", "stones", "lamps", "birds", "trees")  # what the counts count
KNOWS = ("knows that", "says that", "learns that", "is sure that")  # v2's arithmetic prose
HELDOUT_SENTENCES = 300  # held-out narrative (~10k characters): enough for the 64 windows of 128 that the loss reads
COPIES = 8  # shuffled copies of the sentences in the pre-training text: each seen in 8 contexts per epoch
ARITH = 0.05  # v2's share of arithmetic sentences: about 100 in the default world, so each of the 100
              # one-digit sums is stated about once, a little arithmetic beside 85 % facts

def encode(s):
    return [STOI[c] for c in s]

@dataclass(frozen=True)
class Corpus:
    train: torch.Tensor    # (N,) pre-training text: facts in every template, filler (v2: and sums)
    heldout: torch.Tensor  # (M,) narrative sentences never seen in pre-training
    probes: tuple          # (attribute, prompt, true value) for every fact, first template
    stated: frozenset = frozenset()  # task prompts the pre-training text contains ("3+4="): never tested

def narrative(rng):  # one v2 narrative sentence
    a, b, c, d = (rng.choice(words) for words in FILLER)
    return rng.choice(NARRATIVE).format(  # counts, ages, house numbers 2-99 (as the operands; 1 has no
        a=a, b=b, c=c, d=d, n=rng.randint(2, 99), things=rng.choice(THINGS),  # plural), 4-digit years
        year=rng.randint(1200, 1999), time=f"{rng.randint(1, 12)}:{rng.randrange(0, 60, 5):02d}")

def distinct(draw, n):  # the first n distinct results of draw(), in order
    out = {}
    while len(out) < n:
        out[draw()] = None
    return list(out)

@functools.lru_cache(maxsize=4)  # a pure function of its arguments: built once per process
def build_corpus(seed=0, n_people=150, filler=0.1, version="v2", arith=ARITH):
    """filler and arith: the shares of narrative and of arithmetic sentences (v1 ignores arith)."""
    if version not in ("v1", "v2") or not (0 < filler and 0 <= arith and filler + arith < 1):
        raise ValueError(f"build_corpus: version must be v1 or v2 and 0 < filler, 0 <= arith, filler + arith < 1; "
                         f"got {version!r}, {filler}, {arith}")
    rng = random.Random(f"world/{seed}")
    people = set()
    while len(people) < n_people:  # invented names, syllable by syllable
        people.add("".join(rng.choice(c) for c in ("BDFGKLMNPRST", "aeiou", "lnrstv", "aeio")).capitalize())
    people = sorted(people)
    facts, probes = [], []
    for name in people:
        for attr, (values, templates) in ATTRIBUTES.items():
            value = rng.choice(values)
            facts += [t.format(name, value) for t in templates]
            probes.append((attr, "\n" + templates[0].format(name, "\0").split(" \0")[0], value))
    if version == "v1":  # as first shipped: no arithmetic, the grammar's sentences shuffled by the world
        arith, stories = 0.0, sorted({f"The {a} {b} {c} {d}." for a in FILLER[0] for b in FILLER[1]
                                      for c in FILLER[2] for d in FILLER[3]})
        rng.shuffle(stories)
    n_filler, n_arith = (round(share / (1 - filler - arith) * len(facts)) for share in (filler, arith))
    sums = []
    if version == "v2":  # numbers from a stream of their own: the world (and so the probes) stay v1's
        num = random.Random(f"numbers/{seed}")
        stories = distinct(lambda: narrative(num), n_filler + HELDOUT_SENTENCES)
        pairs = [(x, y) for x in range(10) for y in range(10)]
        num.shuffle(pairs)  # every one-digit sum once before any twice
        sums = [f"The {num.choice(FILLER[0])} {num.choice(FILLER[1])} {num.choice(KNOWS)} {x}+{y}={x + y}."
                for x, y in (pairs[i % len(pairs)] for i in range(n_arith))]
    sentences, heldout = facts + stories[:n_filler] + sums, stories[n_filler:n_filler + HELDOUT_SENTENCES]
    # shuffled copies, so that every sentence appears in several contexts
    text = "".join("\n" + "\n".join(rng.sample(sentences, len(sentences))) for _ in range(COPIES))
    return Corpus(torch.tensor(encode(text)), torch.tensor(encode("\n" + "\n".join(heldout))), tuple(probes),
                  frozenset(re.findall(r"\d+\+\d+=", text)))

def sample_problem(task, rng):  # -> (prompt, answer); the answer ends with "." so exact match stops
    if task == "add":
        a, b = rng.randrange(100), rng.randrange(100)
        return f"{a}+{b}=", f"{a + b}."
    if task == "reverse":
        w = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 5)))
        return f"rev {w}=", f"{w[::-1]}."
    if task == "sort":
        d = "".join(rng.choices(string.digits, k=rng.randint(3, 5)))
        return f"sort {d}=", "".join(sorted(d)) + "."
    w, c = "".join(rng.choices("abcd", k=rng.randint(4, 6))), rng.choice("abcd")  # count
    return f"cnt {c}:{w}=", f"{w.count(c)}."

def train_problems(tasks, i, n, rng, held_out, n_old=0):
    """n training problems of tasks[i], never a held-out test prompt; the first n_old are drawn from
    the earlier tasks tasks[:i] (replay of earlier tasks' data, fresh draws of their problems)."""
    problems = []
    while len(problems) < n:
        task = tasks[rng.randrange(i)] if len(problems) < n_old and i > 0 else tasks[i]
        prompt, answer = sample_problem(task, rng)
        if prompt not in held_out[task]:
            problems.append((prompt, answer))
    return problems

@functools.lru_cache(maxsize=16)
def test_problems(task, seed, n, exclude=frozenset()):
    """n distinct held-out problems (training never draws them), none whose prompt is in exclude:
    pass corpus.stated, so that no test problem is answered by the pre-training text."""
    rng, problems = random.Random(f"test/{task}/{seed}"), {}
    while len(problems) < n:
        prompt, answer = sample_problem(task, rng)
        if prompt not in exclude:
            problems[prompt] = answer
    return tuple(problems.items())

def make_rows(prompts, answers):
    """Right-padded (x, y) with targets on the answer tokens only, -1 elsewhere."""
    rows = [encode(p + a) for p, a in zip(prompts, answers)]
    T = max(map(len, rows)) - 1
    x, y = torch.zeros(len(rows), T, dtype=torch.long), torch.full((len(rows), T), -1)
    for r, (row, p) in enumerate(zip(rows, prompts)):
        x[r, :len(row) - 1] = torch.tensor(row[:-1])
        y[r, len(p) - 1:len(row) - 1] = torch.tensor(row[len(p):])
    return x, y

def shard(rows, rank, world):  # this rank's contiguous slice of the global batch
    n = len(rows) // world
    return rows[rank * n:(rank + 1) * n]

def text_windows(data, block_size, n, rng, rank=0, world=1):
    ix = shard([rng.randrange(len(data) - block_size) for _ in range(n)], rank, world)  # same draws on all ranks
    return tuple(torch.stack([data[i + o:i + o + block_size] for i in ix]) for o in (0, 1))  # x, y

# ----------------------------------------------------------------------------------------------
# Scoring a model on the world and the tasks: multiple choice by log-likelihood (as lm-eval scores
# MMLU and ARC), greedy exact match, and the loss on held-out text
@torch.no_grad()
def score_answers(model, prompts, answers, device="cpu", rows_per_batch=512):
    """Per (prompt, answer): the answer's summed log-probability, and whether greedy decoding from
    the prompt writes exactly the answer. Greedy writes it iff every answer token is the argmax
    given the prompt and the answer so far, so one teacher-forced pass decides all rows at once."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(answers[i]))
    logp, exact = [0.0] * len(prompts), [False] * len(prompts)  # batched by length: less padding
    for s in range(0, len(order), rows_per_batch):
        rows = order[s:s + rows_per_batch]
        x, y = make_rows([prompts[i] for i in rows], [answers[i] for i in rows])
        logits = model(x.to(device))[0].float().log_softmax(-1).cpu()  # (B, T, V)
        mask, target = y >= 0, y.clamp(min=0)
        row_logp = (logits.gather(-1, target[..., None])[..., 0] * mask).sum(1).tolist()
        row_exact = ((logits.argmax(-1) == target) | ~mask).all(1).tolist()
        for i, lp, ex in zip(rows, row_logp, row_exact):
            logp[i], exact[i] = lp, ex
    return logp, exact

def fact_scores(model, probes, device="cpu"):
    """fact_mc: the true value is the most likely of the attribute's candidates (multiple
    choice); fact_greedy: greedy decoding writes it; fact_chance: what guessing scores at MC."""
    rows = [(prompt, f" {c}.", c == value)
            for attr, prompt, value in probes for c in ATTRIBUTES[attr][0]]
    logp, exact = score_answers(model, [r[0] for r in rows], [r[1] for r in rows], device)
    mc = greedy = i = 0
    for attr, _, value in probes:
        n = len(ATTRIBUTES[attr][0])
        mc += rows[max(range(i, i + n), key=logp.__getitem__)][2]  # the most likely candidate
        greedy += next(exact[j] for j in range(i, i + n) if rows[j][2])  # the true value's row
        i += n
    n = len(probes)
    return {"fact_mc": mc / n, "fact_greedy": greedy / n,
            "fact_chance": sum(1 / len(ATTRIBUTES[a][0]) for a, _, _ in probes) / n}

def task_scores(model, problems, device="cpu"):
    """(exact-match accuracy, answer loss): the loss, nats per answer character averaged over the
    problems, moves smoothly where the accuracy jumps."""
    prompts, answers = zip(*problems)
    logp, exact = score_answers(model, prompts, answers, device)
    loss = -sum(lp / len(a) for lp, a in zip(logp, answers)) / len(problems)
    return sum(exact) / len(problems), loss

@torch.no_grad()
def estimate_loss(model, text, block_size, device="cpu", max_windows=64):
    """The model's mean loss on the first max_windows windows of held-out text."""
    n = min(max_windows, (len(text) - 1) // block_size)
    x, y = (torch.stack([text[i * block_size + o:(i + 1) * block_size + o] for i in range(n)])
            for o in (0, 1))
    return model(x.to(device), y.to(device))[1].item()
