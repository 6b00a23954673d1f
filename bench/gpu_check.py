"""The Python half of bench/gpu_check.sh: measure a step, and summarize the steps' logs.

    python bench/gpu_check.py measure OUT.json -- train.py --device cuda ...   # run a script, record peak memory
    python bench/gpu_check.py driver                                           # driver against the wheel
    python bench/gpu_check.py summary LOGDIR                                   # one short block per step

gpu_check.sh runs each step under `timeout` and writes LOGDIR/<step>.log (its output) and LOGDIR/<step>.status
("<exit code> <seconds> <time limit>"). `measure` runs a script in this process (runpy, as `python script.py`
would) and writes its wall time and the peak CUDA memory PyTorch allocated, also when the script exits with an
error. `summary` reads only those files, so it is tested on fabricated logs (tests/test_gpu_check.py).
"""
import atexit
import json
import re
import runpy
import sys
import time
from pathlib import Path

# The steps gpu_check.sh runs, in order: name -> what it shows.
STEPS = {
    "install": "venv and requirements from PyPI",
    "driver": "NVIDIA driver against the CUDA version of the torch wheel",
    "kernel_tests": "kernel tests, compiled (TRITON_INTERPRET=0)",
    "bench_attention": "bench/attention.py: ours / sdpa",
    "bench_grad_delta": "bench/grad_delta.py: twin / triton",
    "train_fp32": "train.py --dataset first_hop --device cuda",
    "train_bf16": "train.py --dataset first_hop --device cuda --dtype bfloat16",
    "scores": "scores.py smollm2-135m <fp32 checkpoint> --device cuda",
}
TIMED_OUT = (124, 137)      # timeout(1): 124 when the limit passed, 137 (SIGKILL) when --kill-after was needed


# --- measure ---------------------------------------------------------------------------------------

def measure(out, argv):
    """Run the script argv[0] with arguments argv[1:] here; at exit write {wall_s, peak_mib, exit} to out."""
    import torch
    t0 = time.time()
    record = {"exit": 0}

    def write():
        record["wall_s"] = round(time.time() - t0, 2)
        record["peak_mib"] = (round(torch.cuda.max_memory_allocated() / 2**20, 1)
                              if torch.cuda.is_available() and torch.cuda.is_initialized() else None)
        Path(out).write_text(json.dumps(record))

    atexit.register(write)                       # also after sys.exit() or an exception in the script
    sys.argv = list(argv)
    sys.path.insert(0, str(Path(argv[0]).resolve().parent))
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        record["exit"] = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        raise
    except BaseException:
        record["exit"] = 1
        raise


# --- driver ----------------------------------------------------------------------------------------

def driver_cuda(smi_text):
    """The newest CUDA version the driver supports, from nvidia-smi's header ("CUDA Version: 12.4"), as (12, 4)."""
    m = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", smi_text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def check_driver(smi_text, wheel_cuda):
    """Lines to print and whether the driver runs the wheel: a driver runs CUDA versions up to its own (and,
    by minor-version compatibility, any 12.x on a 12.0+ driver; the kernels' cubins come from Triton's newer
    ptxas, so we ask for the full version)."""
    have = driver_cuda(smi_text)
    if wheel_cuda is None:
        return ["error: this torch wheel has no CUDA (a CPU wheel): install the CUDA one"], False
    need = tuple(int(x) for x in wheel_cuda.split(".")[:2])
    if have is None:
        return ["error: no NVIDIA driver found (nvidia-smi printed no CUDA version)"], False
    lines = [f"driver supports CUDA {have[0]}.{have[1]}; torch wheel built for CUDA {wheel_cuda}"]
    if have < need:
        lines.append(f"error: the driver is older than the wheel's CUDA {wheel_cuda}: update the NVIDIA driver, "
                     f"or install a torch wheel for CUDA <= {have[0]}.{have[1]}")
        return lines, False
    return lines, True


def driver():
    import subprocess

    import torch
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        smi = ""
    lines, ok = check_driver(smi, torch.version.cuda)
    if ok and not torch.cuda.is_available():
        lines, ok = lines + ["error: torch sees no CUDA device (torch.cuda.is_available() is False)"], False
    if ok:
        lines += [f"gpu {torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}, "
                  f"torch {torch.__version__}"]
    print("\n".join(lines))
    sys.exit(0 if ok else 1)


# --- summary ---------------------------------------------------------------------------------------

def read_step(logdir, name):
    """(state, seconds, log text, measured dict): state is ok, FAILED (exit n), TIMED OUT or NOT RUN."""
    status, log = logdir / f"{name}.status", logdir / f"{name}.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    measured = json.loads((logdir / f"{name}.json").read_text()) if (logdir / f"{name}.json").exists() else {}
    if not status.exists():
        return "NOT RUN", None, text, measured
    rc, seconds, limit = (int(float(x)) for x in status.read_text().split()[:3])
    if rc in TIMED_OUT:
        return f"TIMED OUT (limit {limit} s)", seconds, text, measured
    return ("ok" if rc == 0 else f"FAILED (exit {rc})"), seconds, text, measured


def highlights(name, text):
    """The lines of a step's log worth reading in the summary."""
    lines = text.strip().splitlines()
    if name == "kernel_tests":
        return [l for l in lines if re.search(r"\d+ (passed|failed|error)", l)][-1:]
    if name == "driver":
        return [l for l in lines if l.startswith(("driver", "torch", "gpu", "error"))]
    if name in ("bench_attention", "bench_grad_delta"):           # the header and the table rows
        return [l for l in lines if l.strip() and not l.startswith(("Traceback", "  File", "/"))][-8:]
    if name.startswith("train"):
        return [l for l in lines if "impl rank" in l][-1:] + [l for l in lines if l.startswith("wrote")]
    if name == "scores":
        return [l for l in lines if l.startswith("wrote")]
    return []


def summary(logdir):
    logdir = Path(logdir)
    out, results = [f"gpu_check summary ({logdir})"], {}
    for name, what in STEPS.items():
        state, seconds, text, measured = read_step(logdir, name)
        results[name] = (state, measured)
        took = "" if seconds is None else f", {seconds} s"
        peak = f", peak {measured['peak_mib']:.0f} MiB" if measured.get("peak_mib") is not None else ""
        out.append(f"[{state}] {name}: {what}{took}{peak}")
        shown = highlights(name, text) if state == "ok" else text.strip().splitlines()[-3:]
        out += [f"    {line}" for line in shown]
    (s32, m32), (s16, m16) = results["train_fp32"], results["train_bf16"]
    if s32 == s16 == "ok" and m32.get("wall_s") and m16.get("wall_s"):
        line = f"train bf16 / fp32: time {m16['wall_s'] / m32['wall_s']:.2f}x"
        if m32.get("peak_mib") and m16.get("peak_mib"):
            line += f", peak memory {m16['peak_mib'] / m32['peak_mib']:.2f}x"
        out.append(line)
    bad = [n for n, (state, _) in results.items() if state != "ok"]
    out.append("all steps ok" if not bad else f"not ok: {', '.join(bad)}")
    return "\n".join(out), not bad


def main():
    if len(sys.argv) >= 4 and sys.argv[1] == "measure" and "--" in sys.argv:
        i = sys.argv.index("--")
        return measure(sys.argv[2], sys.argv[i + 1:])
    if sys.argv[1:] == ["driver"]:
        return driver()
    if len(sys.argv) == 3 and sys.argv[1] == "summary":
        text, ok = summary(sys.argv[2])
        print(text)
        sys.exit(0 if ok else 1)
    sys.exit(__doc__)


if __name__ == "__main__":
    main()
