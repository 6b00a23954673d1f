"""Help that tells the truth: every flag a script's --help names (its docstring included) is one it accepts, each
default is printed once, --threads says what it does, and graft.py takes its output one way (--out)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

import exact
import graft
import report
import scores
import train
from run_setup import cli

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"train.py": train.main, "scores.py": scores.main, "exact.py": exact.main, "graft.py": graft.main,
           "report.py": report.main}
BENCH = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "bench").glob("*.py") if "argparse" in p.read_text())
# a flag on a line that names another command is that command's (`train.py --freeze X`, `torchrun --nproc_per_node`)
OTHER_COMMAND = re.compile(r"(torchrun|pip|\w+\.py|\.sh)\b[^\n]*$")


def help_of(main, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def accepted(text):
    """The flags the options section lists (what argparse accepts)."""
    options = text.split("\noptions:", 1)[1]
    return set(re.findall(r"^\s+(?:-\w, )?(--[\w-]+)", options, re.M)) | set(re.findall(r", (--[\w-]+)", options))


def named(text):
    """Every --flag the help names, without those on a line that names another command before them."""
    out = set()
    for line in text.splitlines():
        for m in re.finditer(r"(?<![\w-])(--[a-z][\w-]*)", line):
            if not OTHER_COMMAND.search(line[:m.start()]):
                out.add(m.group(1))
    return out


def check(text, where):
    refused = named(text) - accepted(text)
    assert not refused, f"{where} --help names flags it does not accept: {sorted(refused)}"
    for line in re.split(r"\n  (?=-)", text.split("\noptions:", 1)[1]):          # one option's help per item
        flat = " ".join(line.split())
        assert len(re.findall(r"\(default", flat)) <= 1, f"{where}: default printed twice: {flat}"
        assert "(default: None)" not in flat and "(default: False)" not in flat, f"{where}: {flat}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_flag_in_help_is_accepted_and_defaults_print_once(name, capsys):
    check(help_of(SCRIPTS[name], capsys), name)


def test_the_check_catches_a_flag_that_is_refused_and_a_doubled_default():
    text = ("usage: x\n\nuse --exact here\n\noptions:\n  -h, --help  help\n"
            "  --out OUT   where (default: a) (default: None)\n")
    with pytest.raises(AssertionError, match="does not accept"):
        check(text, "x")
    with pytest.raises(AssertionError, match="twice"):
        check(text.replace("--exact", "--out").replace("use", "see train.py --freeze; use"), "x")
    assert named("torchrun --nproc_per_node 2 report.py --grid\n") == set()


@pytest.mark.parametrize("path", BENCH)
def test_every_benchmark_help_is_truthful(path):
    text = subprocess.run([sys.executable, path, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=True).stdout
    check(text, path)


def test_threads_help_says_what_the_default_is(capsys):
    for name in ("train.py", "scores.py", "exact.py", "report.py"):
        flat = " ".join(help_of(SCRIPTS[name], capsys).split())
        assert f"every core this process may use, {cli.cpu_count()} here" in flat, name
        assert "busy" not in flat, name                             # no rule it does not apply
    assert train.main.__globals__["cli"].cpu_count() == cli.cpu_count()


def test_graft_output_is_given_by_out_and_the_old_positional_still_works(tmp_path):
    for argv in (["--base", "A", "--add", "B", "--sub", "C"], ["--experiment", "--base", "A"]):
        with pytest.raises(SystemExit) as e:                        # a wrong command: one line, nothing run
            graft.main(argv)
        assert str(e.value.code).startswith("error: ") and "--out" in str(e.value.code), e.value.code
    with pytest.raises(SystemExit) as e:                            # the output given both ways
        graft.main([str(tmp_path / "a"), "--out", str(tmp_path / "b"), "--base", "A", "--add", "B", "--sub", "C"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:                            # OUT as before: the same as --out OUT
        graft.main([str(tmp_path / "a"), "--base", str(tmp_path / "nowhere"), "--add", "B", "--sub", "C"])
    assert "nowhere" in str(e.value.code)
