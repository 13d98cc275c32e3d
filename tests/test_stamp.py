"""Stamps by meaning: comments, docstrings and layout are free; any change to what runs, in any module
the training code imports, stales what that code made (cached runs and the pre-trained checkpoint)."""
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
import pretrain
import sweep
from stamp import changed, stamp

RUNS, CHECKPOINT = "train_tiny.py", "pretrain.py"  # what the runs' and the checkpoint's stamps start at


@pytest.fixture
def repo(tmp_path):
    for f in ROOT.glob("*.py"):
        shutil.copy(f, tmp_path / f.name)
    return tmp_path


def edit(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_the_stamps_follow_the_imports():
    runs, checkpoint = stamp(RUNS), stamp(CHECKPOINT)
    assert {"train_tiny.py", "pretrain.py", "model.py", "data.py", "mofo.py", "hft.py", "stamp.py",
            "torch"} <= set(runs)
    assert set(checkpoint) == {"pretrain.py", "loop.py", "model.py", "data.py", "stamp.py", "torch"}
    assert sweep.STAMP == runs and pretrain.CODE == checkpoint  # what the code in front of us stamps


def test_comments_docstrings_and_layout_keep_every_stamp(repo):
    before = {entry: stamp(entry, repo) for entry in (RUNS, CHECKPOINT)}
    for module in before[RUNS]:
        if module == "torch":
            continue
        path = repo / module
        text = path.read_text()
        assert text.startswith('"""')  # every module opens with its docstring: edit it
        text = '"""A reader rewrote this docstring.\n\n' + text[3:]
        text = text.replace("\n\n", "\n\n# a reader's comment\n\n", 3).replace("(", "(  ", 1)
        path.write_text(text + "\n\n\n# the end\n")
    for entry, was in before.items():
        assert stamp(entry, repo) == was, entry


@pytest.mark.parametrize("module", ["train_tiny.py", "pretrain.py", "model.py", "data.py", "mofo.py",
                                    "hft.py", "stamp.py", "report.py"])
def test_a_code_change_in_any_imported_module_changes_the_stamps_that_cover_it(repo, module):
    before = {entry: stamp(entry, repo) for entry in (RUNS, CHECKPOINT)}
    with open(repo / module, "a") as f:
        f.write("\nA_NEW_CONSTANT = 1\n")  # unused, but code: it could be used
    for entry, was in before.items():
        now = stamp(entry, repo)
        assert changed(was, now) == ([module] if module in was else []), entry


def test_a_fine_tuning_change_keeps_the_pretrained_checkpoint(repo):
    was = stamp(CHECKPOINT, repo)
    edit(repo / "mofo.py", "import math", "import math\nTWEAK = 2")
    assert stamp(CHECKPOINT, repo) == was and changed(stamp(RUNS, repo), stamp(RUNS)) == ["mofo.py"]


def test_a_new_module_imported_by_the_training_code_is_covered_without_a_list(repo):
    (repo / "schedule.py").write_text('"""A new idea."""\nWARMUP = 10\n')
    edit(repo / "model.py", "import math", "import math\nfrom schedule import WARMUP")
    runs, checkpoint = stamp(RUNS, repo), stamp(CHECKPOINT, repo)
    assert "schedule.py" in runs and "schedule.py" in checkpoint
    edit(repo / "schedule.py", "WARMUP = 10", "WARMUP = 20")
    assert changed(runs, stamp(RUNS, repo)) == ["schedule.py"]
    assert changed(checkpoint, stamp(CHECKPOINT, repo)) == ["schedule.py"]
    # imported lazily, inside a function, it is covered as well
    (repo / "later.py").write_text("X = 1\n")
    edit(repo / "train_tiny.py", "def run(cfg: Config) -> dict:\n",
         "def run(cfg: Config) -> dict:\n    import later\n")
    assert "later.py" in stamp(RUNS, repo)


def test_a_stale_cached_run_and_a_stale_checkpoint_name_what_changed():
    assert sweep.stale({"fingerprint": {**sweep.STAMP, "hft.py": "old"}}, sweep.STAMP) == ["hft.py"]
    assert sweep.stale({"fingerprint": {k: v for k, v in sweep.STAMP.items() if k != "model.py"}},
                       sweep.STAMP) == ["model.py"]
    assert sweep.stale({"fingerprint": dict(sweep.STAMP)}, sweep.STAMP) == []
