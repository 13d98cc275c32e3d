"""Tests for data.py: v1 is the corpus as shipped (bitwise), v2 keeps its world and lets every task
character be read in pre-training, never states a 2-digit problem, and keeps what it states out of
the test problems; `arith` sets the share of arithmetic sentences."""

import hashlib
import random
import re
import string

import pytest
import torch

import data

ONE_DIGIT_SUMS = frozenset(f"{x}+{y}=" for x in range(10) for y in range(10))


def decode(ids):
    return "".join(data.VOCAB[i] for i in ids.tolist())


def sentences(corpus):  # the distinct sentences of the pre-training text
    return set(decode(corpus.train).split("\n")[1:])


def facts(corpus):  # the sentences that name a person
    names = {prompt.split()[0] for _, prompt, _ in corpus.probes}
    return {s for s in sentences(corpus) if names & set(s.rstrip(".").split())}


def test_v1_is_the_corpus_as_shipped():
    c = data.build_corpus(0, 150, 0.1, version="v1")
    blob = decode(c.train) + "\0" + decode(c.heldout) + "\0" + repr(c.probes)
    # sha256 of build_corpus(0, 150, 0.1) before v2 existed (commit ed19ca9): the v1 corpus as shipped
    assert hashlib.sha256(blob.encode()).hexdigest() == \
        "e5346266a05919c73ef2071c1edf7d5aefc7551b6ed495abbbb178e3fd14fa59"
    assert c.stated == frozenset() and not re.search(r"[0-9+:=]", decode(c.train))


def test_v1_test_problems_unchanged():
    problems = [data.test_problems(t, 0, 500) for t in data.TASKS]
    # sha256 of the test problems of every task before `exclude` existed (commit ed19ca9)
    assert hashlib.sha256(repr(problems).encode()).hexdigest() == \
        "e87fd85b266c7dba095b7f2b9e5ece784153e6429af773d4f1bf30daf464395a"
    v1 = data.build_corpus(0, 150, 0.1, version="v1")
    assert [data.test_problems(t, 0, 500, exclude=v1.stated) for t in data.TASKS] == problems


def test_v2_keeps_the_world_of_v1():
    for seed in (0, 1):
        v1, v2 = (data.build_corpus(seed, 150, 0.1, version=v) for v in ("v1", "v2"))
        assert v2.probes == v1.probes
        assert len(facts(v2)) == 3 * len(v2.probes) and facts(v2) == facts(v1)


def test_v2_every_task_character_is_read_in_pretraining():
    c = data.build_corpus(0, 150, 0.1)
    rng = random.Random(0)
    used = {ch for t in data.TASKS for _ in range(500) for ch in "".join(data.sample_problem(t, rng))}
    assert used <= set(decode(c.train))
    prose = "".join(s for s in sentences(c) if "+" not in s)  # digits and ':' belong to the narrative
    assert set(string.digits + ":") <= set(prose) and "=" not in prose
    for role in (r"sees \d+ ", r" is \d+ years old\.", r" at number \d+\.", r"In \d{4} ", r" shows \d+:\d\d\."):
        assert re.search(role, prose), role  # a count, an age, a house number, a year, a time
    assert not used <= set(decode(data.build_corpus(0, 150, 0.1, version="v1").train))  # what v2 fixed


def test_v2_states_one_digit_sums_in_prose_only():
    c = data.build_corpus(0, 150, 0.1)
    text = decode(c.train)
    assert not re.search(r"\d\d\+|\+\d\d", text)  # never a 2-digit operand
    assert not re.search(r"(^|\n)[\d+=.]+(\n|$)", text)  # never the task's bare line "3+4=7."
    for x, y, z in re.findall(r" (\d)\+(\d)=(\d+)\.\n", text + "\n"):
        assert int(x) + int(y) == int(z)
    assert len(re.findall(r"\+", text)) == len(re.findall(r" \d\+\d=\d+\.\n", text + "\n"))  # each one checked
    assert "+" not in decode(c.heldout)


def test_stated_prompts_are_excluded_from_test_problems():
    c = data.build_corpus(0, 150, 0.1)
    assert c.stated == ONE_DIGIT_SUMS  # about 106 sums in the default world: all 100 stated
    assert all(f" {p}" in decode(c.train) for p in c.stated)
    plain, kept = data.test_problems("add", 0, 500), data.test_problems("add", 0, 500, exclude=c.stated)
    assert len(kept) == 500 and len(dict(kept)) == 500 and not {p for p, _ in kept} & c.stated
    dropped = [q for q in plain if q[0] in c.stated]
    assert dropped  # the exclusion did something: the same draws, minus the stated, then continued
    assert kept[:500 - len(dropped)] == tuple(q for q in plain if q[0] not in c.stated)
    for task in ("reverse", "sort", "count"):  # nothing stated for them: unchanged
        assert data.test_problems(task, 0, 100, exclude=c.stated) == data.test_problems(task, 0, 100)


def test_v2_is_deterministic_per_seed():
    build = data.build_corpus.__wrapped__  # bypass the cache: really build it twice
    a, b, c = build(0, 20, 0.1), build(0, 20, 0.1), build(1, 20, 0.1)
    assert torch.equal(a.train, b.train) and torch.equal(a.heldout, b.heldout)
    assert a.probes == b.probes and a.stated == b.stated
    assert not torch.equal(a.train, c.train) and not torch.equal(a.heldout, c.heldout)
    held = set(decode(a.heldout).split("\n")[1:])
    assert len(held) == 300 and not held & sentences(a)  # new sentences of the same narrative
    assert re.search(r"\d", "".join(held))


@pytest.mark.parametrize("arith", [0.0, 0.05, 0.2])
def test_arith_is_the_share_of_arithmetic_sentences(arith):
    c = data.build_corpus(0, 150, 0.1, arith=arith)
    lines = decode(c.train).split("\n")[1:]  # eight copies: shares as in the distinct sentences
    n_facts, n_arith = 3 * len(c.probes), sum("+" in s for s in lines) // 8
    n = n_facts / (1 - 0.1 - arith)  # sentences in all
    assert abs(n_arith - arith * n) <= 0.5 and len(lines) // 8 - n_facts - n_arith == round(0.1 * n)
    assert (c.stated == ONE_DIGIT_SUMS) if arith else (c.stated == frozenset())


def test_bad_arguments_raise():
    for kw in (dict(version="v3"), dict(arith=-0.1), dict(filler=0.5, arith=0.5), dict(filler=0.0)):
        with pytest.raises(ValueError, match="build_corpus"):
            data.build_corpus(0, 10, **{"filler": 0.1, **kw})


def task_of(prompt):  # which task a prompt belongs to, from its format alone
    return "add" if "+" in prompt else {"rev": "reverse", "sort": "sort", "cnt": "count"}[prompt.split(" ")[0]]


def test_train_problems_replay_earlier_tasks_first_and_never_a_test_prompt():
    tasks, held_out = ("add", "reverse", "sort"), {t: set() for t in ("add", "reverse", "sort")}
    held_out["add"] = {p for p, _ in data.test_problems("add", 0, 500)}
    rows = data.train_problems(tasks, 2, 64, random.Random(0), held_out, n_old=16)
    kinds = [task_of(p) for p, _ in rows]
    assert len(rows) == 64 and set(kinds[16:]) == {"sort"}
    assert set(kinds[:16]) == {"add", "reverse"}  # both earlier tasks, nothing of the current one
    many = data.train_problems(tasks, 1, 4000, random.Random(1), held_out, n_old=4000)
    assert {task_of(p) for p, _ in many} == {"add"} and not {p for p, _ in many} & held_out["add"]


def test_train_problems_without_replay_draw_as_a_single_task_does():
    # the first task, or n_old = 0, draws exactly the single-task stream: cached runs stay valid
    held_out = {"add": set(), "reverse": set()}
    plain_rng, rng = random.Random(3), random.Random(3)
    plain = [data.sample_problem("add", plain_rng) for _ in range(32)]
    assert data.train_problems(("add", "reverse"), 0, 32, rng, held_out, n_old=8) == plain
    plain = [data.sample_problem("reverse", plain_rng) for _ in range(32)]
    assert data.train_problems(("add", "reverse"), 1, 32, rng, held_out) == plain
