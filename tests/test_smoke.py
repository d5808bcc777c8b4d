import glob
from pathlib import Path

import patterndsl as P

SPEC_EXAMPLES = sorted(glob.glob(str(Path(__file__).resolve().parent / "examples/*.pat")))


def test_spec_examples_check() -> None:
    assert SPEC_EXAMPLES, "tests/examples holds no .pat file"
    for path in SPEC_EXAMPLES:
        P.load(path)
