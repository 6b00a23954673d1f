"""What every script's command line shares: argument types that refuse nonsense when the arguments are parsed
(before any model loads), and the one way a user's mistake ends a script: one line saying what to do."""
import argparse
import math
import os
import re
import sys

import torch


def positive_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{s} must be at least 1")
    return v


def positive_float(s):
    """A finite number > 0 (a learning rate): 0, negative, nan and inf are refused."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"{s} must be a finite number above 0")
    return v


def fraction(s):
    """A number in (0, 1]: a share of the way (exact.py's --ablation, 0.05 = 5% of the way from y to y*)."""
    v = positive_float(s)
    if v > 1:
        raise argparse.ArgumentTypeError(f"{s} is not a fraction: give a number in (0, 1], e.g. 0.05 for 5%")
    return v


def seed_list(text):
    """argparse type of --only-seeds: '0,2' -> [0, 2]."""
    try:
        out = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give seeds as integers separated by commas, e.g. 1,2") from None
    if any(x < 0 for x in out):
        raise argparse.ArgumentTypeError(f"{text!r}: seeds are 0 or more")
    return sorted(set(out))


def device_name(name):
    """--device: a name torch accepts (cpu, cuda, cuda:1, ...), checked when the arguments are parsed."""
    try:
        torch.device(name)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    return name


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_count():
    """The cores this process may use (Linux: its affinity mask; macOS has no such call)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def revision_flag(p, what="--model"):
    """--revision, the same in every script that takes a hub id (checkpoint.resolve)."""
    p.add_argument("--revision", default=None, help=f"the branch, tag or commit of {what} when it is a hub id (e.g. "
                   "OLMo's step477000-tokens2000B); an error with a local directory or the embedded default")


def threads_flag(p):
    """--threads, the same in every script: torch's CPU threads, by default every core this process may use."""
    p.add_argument("--threads", type=positive_int, default=cpu_count(),
                   help=f"CPU threads for torch (default: every core this process may use, {cpu_count()} here; "
                        "fewer leave cores to other processes on a shared machine)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The docstring as written, and each option's default once: appended unless its help already states one,
    and not for None or a switch's False, which say nothing."""

    def _get_help_string(self, action):
        text = action.help or ""
        said = re.search(r"\bdefault[: ]", text)                  # "(default: the one in metrics.json)"
        if said or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def parser(doc):
    """An ArgumentParser whose description is the script's docstring and whose --help shows every default once."""
    return argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)


def run(fn, *args):
    """Call a script's work; a mistake the user can fix (ValueError, OSError: a bad file, path or setting) ends it
    with one line on stderr and exit status 1, never a traceback. Anything else is a bug and keeps its traceback."""
    try:
        return fn(*args)
    except (ValueError, OSError) as e:
        # under torchrun every rank meets the same mistake: rank 0 says it, the others only stop
        sys.exit(f"error: {e}" if os.environ.get("RANK", "0") == "0" else 1)
    except KeyboardInterrupt:
        sys.exit("interrupted: earlier outputs are as they were")
