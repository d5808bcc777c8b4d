import glob
from pathlib import Path

import patterndsl as P

SPEC_EXAMPLES = sorted(glob.glob(str(Path(__file__).resolve().parents[2] / "shared/spec/examples/*.pat")))


def test_spec_examples_check() -> None:
    assert SPEC_EXAMPLES, "../shared/spec/examples not found beside the checkout"
    for path in SPEC_EXAMPLES:
        P.load(path)
