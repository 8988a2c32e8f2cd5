"""`nh2st --help` and `nh2st splits` answer without importing torch (it costs ~2 s a call)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("argv", [["--help"], ["splits", "--dataset", "zen"], ["train", "--help"]])
def test_light_commands_do_not_import_torch(argv):
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom cli.main import app\n"
            f"result = CliRunner().invoke(app, {argv!r})\n"
            "assert result.exit_code == 0, result.output\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
