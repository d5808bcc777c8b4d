import glob

from helpers import EXAMPLES

import patterndsl as P

SPEC_EXAMPLES = sorted(glob.glob(str(EXAMPLES / "*.pat")))


def test_spec_examples_check() -> None:
    assert SPEC_EXAMPLES, "tests/examples holds no .pat file"
    for path in SPEC_EXAMPLES:
        P.load(path)
