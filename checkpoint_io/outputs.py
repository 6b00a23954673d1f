"""The one way every output is written (checkpoints, scores, grafts, reports, the embedded models' cache).

Outputs (checkpoints, scores, grafts, reports) follow one rule, "nothing lost":
  - every output is written into a fresh hidden sibling (`.NAME.tmp-PID-XXXX`) and renamed into place, so a killed
    run leaves the old output or the new one, never a mix;
  - an existing output is replaced only if it is one of ours: a directory whose marker file (MARKER) says it is
    the same kind of output and lists every entry it holds. Anything else (a user's directory, a file, a
    checkpoint with notes added) stops the run with a one-line error before any work, unless `overwrite=True`;
  - never, `overwrite` or not, does an output replace, hold or sit inside an input of the run (a checkpoint, the
    dataset file), the embedded models' cache (the base of every later run), or a directory that holds the home
    or the current directory;
  - a write that fails (a full disk) is one line, and the old output stays;
  - leftovers of killed runs (temporaries, a displaced old output) are cleaned, or put back, the next time.
"""
import errno
import json
import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

MARKER = "extractive-structures.json"   # in every output directory we write: {"kind", "files"}


class UserError(ValueError):
    """An error the user can fix (a path, a file, an argument): scripts print it as one line, no traceback."""


def cache_root() -> Path:
    """The embedded models' cache (checkpoint_io/default_model.py converts them into it); here because no output
    but theirs may touch it."""
    return Path(os.environ.get("EXTRACTIVE_CACHE") or Path.home() / ".cache" / "extractive-structures")


def _tmp_name(path: Path, tag):
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{secrets.token_hex(3)}")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                                      # someone else's process: alive
        return True
    return True


def clean_leftovers(out, log=print):
    """Remove the temporaries of killed runs beside `out`; put a displaced old output back if the new one never
    arrived (killed between the two renames of publish). Temporaries of live processes are left alone."""
    out = Path(out)
    if not out.parent.is_dir():
        return
    for p in sorted(out.parent.glob(f".{out.name}.*-*-*")):
        tag, pid = p.name[len(out.name) + 2:].split("-")[:2]
        if tag not in ("tmp", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if tag == "old" and not out.exists() and not out.is_symlink():
            os.replace(p, out)
            log(f"note: {out} was displaced by a killed run; put back")
        else:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            log(f"note: removed {p.name}, left by a killed run")


def is_ours(out: Path, kind):
    """`out` is a directory we wrote as `kind`, holding nothing but the files its marker lists."""
    marker = out / MARKER
    if out.is_symlink() or not out.is_dir() or not marker.is_file():
        return False
    try:
        m = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return m.get("kind") == kind and {p.name for p in out.iterdir()} <= set(m.get("files", [])) | {MARKER}


def check_output(out, kind, overwrite=False, inputs=(), log=print):
    """Before any work: `out` can be written, and replacing it loses nothing of the user's. Returns the Path."""
    out = Path(out)
    where = out.resolve()
    for d in (Path.home().resolve(), Path.cwd().resolve()):
        if where == d or where in d.parents:                      # the filesystem root, /home, ~, ~/.., . or ..
            raise UserError(f"refusing to write the output {out} over {where}, which holds this run's or your "
                            "files: give a new path")
    # the embedded models' cache counts as an input of every run: a finetune written there becomes the base of
    # every later run, unnoticed. Only their conversion (kind "embedded-model") writes into it
    cache = [] if kind == "embedded-model" else [cache_root().resolve()]
    for i in [*inputs, *cache]:
        i = Path(i).resolve()
        if i == where or where in i.parents or i in where.parents:
            how = "replace" if i == where else "hold" if where in i.parents else "sit inside"
            what = "the embedded models' cache" if i in cache else "the input"
            raise UserError(f"the output {out} would {how} {what} {i}: give another output path")
    clean_leftovers(out, log)
    empty = out.is_dir() and not out.is_symlink() and not any(out.iterdir())    # replacing it loses nothing
    if (out.exists() or out.is_symlink()) and not (overwrite or empty or is_ours(out, kind)):
        what = "a file" if out.is_file() else "not a " + kind + " output of ours" if not (out / MARKER).exists() \
            else f"a {kind} output with files added by hand"
        raise UserError(f"{out} exists and is {what}: choose another output path, or pass --overwrite to replace "
                        "it whole")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as e:
        raise UserError(f"cannot write the output {out}: {e.strerror or e}") from None
    return out


def _publish(tmp: Path, out: Path):
    """Rename the finished `tmp` over `out`: two renames, the old output kept aside until the new one is in."""
    old = None
    if out.exists() or out.is_symlink():
        old = _tmp_name(out, "old")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


@contextmanager
def atomic_dir(out, kind, overwrite=False, inputs=(), log=print):
    """Yields a fresh hidden directory beside `out` to fill; when the block ends without error it gets the marker
    and replaces `out` whole (see the module docstring for when that is allowed); otherwise it is removed."""
    out = check_output(out, kind, overwrite, inputs, log)
    tmp = _tmp_name(out, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        files = sorted(p.name for p in tmp.iterdir())
        (tmp / MARKER).write_text(json.dumps({"kind": kind, "files": files}, indent=1) + "\n")
        check_output(out, kind, overwrite, inputs, log)           # again: the user may have made it meanwhile
        _publish(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_if_full(e, out)
        raise


def _raise_if_full(e, out):
    """A full disk (or quota) while writing `out` as one line. safetensors' save_file raises its own SafetensorError,
    which is no OSError, so the scripts' one-line handler (run_setup/cli.py) would not see it."""
    if isinstance(e, SafetensorError) or isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(f"cannot write {out} ({reason}); the old output is unchanged: free disk space or choose "
                        "another output path, then run again") from None


def work_dir(path, kind):
    """A directory that collects an experiment's stages, kept and reused across runs (never replaced whole). It
    is marked as ours when made; an existing directory that is not ours and not empty is refused."""
    p = Path(path)
    marker = p / MARKER
    if p.exists() and not p.is_dir():
        raise UserError(f"{p} exists and is a file: choose another work directory")
    if p.is_dir() and any(p.iterdir()) and not marker.is_file():
        raise UserError(f"{p} exists and is not a work directory of ours: choose another one")
    try:
        p.mkdir(parents=True, exist_ok=True)
        if not marker.is_file():
            write_atomic(marker, json.dumps({"kind": kind, "files": "stages, kept across runs"}) + "\n")
    except OSError as e:
        raise UserError(f"cannot write the work directory {p}: {e.strerror or e}") from None
    return p


def write_atomic(path, content):
    """Write one file: `content` is text, bytes, or a function that writes the file at the path it is given
    (safetensors' save_file, a matplotlib figure's savefig). Written beside `path`, then renamed over it."""
    path = Path(path)
    tmp = _tmp_name(path, "tmp")
    try:
        if callable(content):
            content(tmp)
        elif isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        _raise_if_full(e, path)
        raise


def write_json(path, obj):
    """Strict JSON (no NaN or Infinity, which strict readers reject), atomically."""
    write_atomic(path, json.dumps(obj, indent=1, allow_nan=False) + "\n")


SAVE_DPI = 110                 # every figure's resolution: tests/test_figures.py checks them at this size


def save_figure(fig, path):
    """A matplotlib figure as PNG, atomically; the figure is closed."""
    import matplotlib.pyplot as plt
    write_atomic(path, lambda p: fig.savefig(p, dpi=SAVE_DPI, format="png"))
    plt.close(fig)
