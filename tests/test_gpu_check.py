"""Tests for bench/gpu_check.sh and bench/gpu_check.py: every part that can run without a GPU.

The script's syntax and its list of steps (--dry-run), the summary on fabricated step logs (a step that passed,
one that timed out, one that failed, one that never ran), the driver check on fabricated nvidia-smi output, and
`measure` on a small script that exits with an error.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402

SCRIPT = ROOT / "bench" / "gpu_check.sh"


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_dry_run_lists_every_step_within_eight_minutes(tmp_path):
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env={"PATH": "/usr/bin:/bin",
                         "GPU_CHECK_LOGDIR": str(tmp_path)}, capture_output=True, text=True, check=True).stdout
    steps = re.findall(r"^(\w+) \(limit (\d+) s\)", out, flags=re.M)
    assert [name for name, _ in steps] == list(gpu_check.STEPS)
    assert sum(int(limit) for _, limit in steps) <= 8 * 60
    assert "TRITON_INTERPRET=0" in out and "--dtype bfloat16" in out and "--device cuda" in out
    assert not list(tmp_path.glob("*.status"))                    # nothing ran


def fake_logs(d, broken=True):
    """Step logs and status files as gpu_check.sh writes them."""
    def put(name, rc, seconds, limit, log, measured=None):
        (d / f"{name}.log").write_text(log)
        (d / f"{name}.status").write_text(f"{rc} {seconds} {limit}\n")
        if measured is not None:
            (d / f"{name}.json").write_text(json.dumps(measured))
    put("install", 0, 95, 120, "")
    put("driver", 0, 1, 15, "driver supports CUDA 12.8; torch wheel built for CUDA 12.8\n"
        "gpu NVIDIA H100, capability (9, 0)\n")
    put("kernel_tests", 0, 80, 150, "......\n46 passed in 79.1s\n")
    put("bench_attention", 0, 30, 45, "NVIDIA H100\n         T  max|diff|   fwd ours\n      1024      0.002      0.1\n")
    put("bench_grad_delta", 124 if broken else 0, 25, 25, "q_proj   32 heads  0.5 0.2 2.5\n")
    put("train_fp32", 0, 40, 50, "epoch 8 fact rank 0.00 impl rank 1.55\nwrote /tmp/x (38.0 s)\n",
        {"exit": 0, "wall_s": 40.0, "peak_mib": 2000.0})
    put("train_bf16", 1 if broken else 0, 30, 45, "Traceback (most recent call last):\nRuntimeError: boom\n"
        if broken else "wrote /tmp/y (30.0 s)\n", {"exit": 1 if broken else 0, "wall_s": 30.0, "peak_mib": 1500.0})
    if not broken:
        put("scores", 0, 12, 30, "wrote /tmp/s/scores.safetensors, scores.png, summary.txt in 11.0 s\n",
            {"exit": 0, "wall_s": 12.0, "peak_mib": 900.0})


def test_summary_reports_timeouts_failures_and_missing_steps(tmp_path):
    fake_logs(tmp_path)
    text, ok = gpu_check.summary(tmp_path)
    assert not ok
    assert "[ok] kernel_tests" in text and "46 passed" in text
    assert "[TIMED OUT (limit 25 s)] bench_grad_delta" in text
    assert "[FAILED (exit 1)] train_bf16" in text and "RuntimeError: boom" in text   # the failure's last lines
    assert "[NOT RUN] scores" in text
    assert "peak 2000 MiB" in text
    assert "train bf16 / fp32" not in text                        # no ratio from a failed run
    assert text.splitlines()[-1] == "not ok: bench_grad_delta, train_bf16, scores"


def test_summary_of_a_good_run_gives_the_ratios(tmp_path):
    fake_logs(tmp_path, broken=False)
    text, ok = gpu_check.summary(tmp_path)
    assert ok and text.splitlines()[-1] == "all steps ok"
    assert "train bf16 / fp32: time 0.75x, peak memory 0.75x" in text
    assert "gpu NVIDIA H100" in text and "1024      0.002" in text


def test_summary_command_exits_nonzero_when_a_step_failed(tmp_path):
    fake_logs(tmp_path)
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "summary", str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode == 1 and "not ok" in done.stdout


SMI = "| NVIDIA-SMI 550.54.15   Driver Version: 550.54.15   CUDA Version: {} |"


@pytest.mark.parametrize("driver,wheel,ok", [("12.8", "12.8", True), ("12.4", "12.8", False),
                                             ("13.0", "12.8", True), (None, "12.8", False), ("12.8", None, False)])
def test_driver_check(driver, wheel, ok):
    lines, good = gpu_check.check_driver(SMI.format(driver) if driver else "", wheel)
    assert good == ok
    assert any(l.startswith("error") for l in lines) == (not ok)


def test_measure_records_time_and_exit_of_a_failing_script(tmp_path):
    script = tmp_path / "job.py"
    script.write_text("import sys\nprint('working', sys.argv[1:])\nsys.exit(3)\n")
    out = tmp_path / "m.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "measure", str(out), "--",
                           str(script), "--flag"], capture_output=True, text=True)
    assert done.returncode == 3 and "working ['--flag']" in done.stdout
    m = json.loads(out.read_text())
    assert m["exit"] == 3 and m["wall_s"] >= 0 and m["peak_mib"] is None     # no CUDA here
