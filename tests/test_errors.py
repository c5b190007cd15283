import subprocess
import sys

import pytest

from breastgen.errors import BreastGenError, find_breastgen_error, main_guard


def test_message_is_one_line_with_path():
    e = BreastGenError("bad\nthing  here", path="/a/b.dcm")
    assert str(e) == "/a/b.dcm: bad thing here" and e.reason == "bad thing here"


def test_found_through_monai_wrapping():
    from monai.transforms import Compose, Lambda

    def boom(_):
        raise BreastGenError("boom", "x.png")

    with pytest.raises(RuntimeError) as info:
        Compose([Lambda(boom)])(1)
    assert str(find_breastgen_error(info.value)) == "x.png: boom"
    assert find_breastgen_error(RuntimeError("other")) is None


def test_main_guard_exit_code(capsys):
    @main_guard
    def main():
        raise BreastGenError("no such file", "in.dcm")

    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "error: in.dcm: no such file"


def test_uncaught_wrapped_error_prints_one_line_and_exits_2():
    code = ("import breastgen\n"
            "from breastgen.errors import BreastGenError\n"
            "try:\n    raise BreastGenError('unknown vendor', 'p.json')\n"
            "except BreastGenError as e:\n    raise RuntimeError('applying transform') from e\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: p.json: unknown vendor"]
    # other errors keep their traceback
    r = subprocess.run([sys.executable, "-c", "import breastgen\nraise KeyError('x')"], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" in r.stderr
