"""Every test file runs alone, by `pytest tests/test_x.py` or `python -m pytest` from any folder:
the project's modules are plain files at the repository's root, put on the path here once."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
