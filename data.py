"""The built-in corpus and the fine-tuning tasks of the tiny forgetting experiment.

An invented world (people with a city, a job, a pet and a colour) is stated in several sentence
templates, so that its facts are learned as knowledge, not as one string; narrative sentences from a
small grammar carry "general language", and sentences never used in pre-training measure it. The
fine-tuning tasks are new skills with exact answers. Everything is generated from a seed: no download,
and the same generator with a smaller world gives tests a corpus that trains in seconds.

Kept apart from train_tiny.py as nanoGPT keeps its data preparation apart from its model and loop:
a reader changing the world or a task reads this file only.
"""
import functools
import random
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

def encode(s):
    return [STOI[c] for c in s]

@dataclass(frozen=True)
class Corpus:
    train: torch.Tensor    # (N,) pre-training text: facts in every template, plus filler
    heldout: torch.Tensor  # (M,) narrative sentences never seen in pre-training
    probes: tuple          # (attribute, prompt, true value) for every fact, first template

@functools.lru_cache(maxsize=4)  # a pure function of its arguments: built once per process
def build_corpus(seed=0, n_people=150, filler=0.1):
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
    narrative = sorted({f"The {a} {b} {c} {d}." for a in FILLER[0] for b in FILLER[1]
                        for c in FILLER[2] for d in FILLER[3]})
    rng.shuffle(narrative)
    n_filler = round(filler / (1 - filler) * len(facts))
    sentences, heldout = facts + narrative[:n_filler], narrative[n_filler:n_filler + 300]
    # eight shuffled copies, so that every sentence appears in several contexts
    text = "".join("\n" + "\n".join(rng.sample(sentences, len(sentences))) for _ in range(8))
    return Corpus(torch.tensor(encode(text)), torch.tensor(encode("\n" + "\n".join(heldout))), tuple(probes))

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

@functools.lru_cache(maxsize=16)
def test_problems(task, seed, n):  # distinct held-out problems; training never draws them
    rng, problems = random.Random(f"test/{task}/{seed}"), {}
    while len(problems) < n:
        problems.update([sample_problem(task, rng)])
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
