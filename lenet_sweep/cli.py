"""`python -m lenet_sweep [overrides]` and `lenet-sweep`: the Hydra app and its command line."""

from lenet_sweep import speed

speed.slow_startup_gc()  # before the imports below and the ones a run makes

import contextlib
import difflib
import os
import re
import shutil
import signal
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lenet_sweep import CONFIG_DIR, config, errors
from lenet_sweep.errors import UserError, exit_with
from lenet_sweep.signals import Terminated
from lenet_sweep.tracking import backend

# The schema conf/config.yaml extends, stored where the app is defined (as Hydra's docs do), so
# that launcher processes that import this module to run `main` have it too.
config.register()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> dict[str, float]:
    """Train once (or once per trial under -m); returns the final metrics (the objectives)."""
    from lenet_sweep.core.hooks import Diverged  # here, not at import: `--help` needs no torch
    from lenet_sweep.job.run import run

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    single = HydraConfig.get().mode == RunMode.RUN
    try:
        return run(cfg)
    except UserError as e:
        if not single:
            raise  # the sweeper records it as the trial's failure
        if isinstance(e, errors.Outage) and (run_dir / "checkpoint.pt").is_file():
            e = errors.Outage(f"{e}; this run goes on with resume={run_dir}")
        elif not isinstance(e, Diverged):  # refused before training: leave no run dir behind
            with contextlib.suppress(OSError):
                _discard_untouched(run_dir)
        exit_with(e)
    except KeyboardInterrupt as e:
        resumable = single and (run_dir / "checkpoint.pt").is_file()
        e.run_dir = run_dir if resumable else None  # for the line that says how to resume
        raise


class RunDirRecord(Callback):
    """hydra.callbacks (conf/config.yaml): what a single run's dir held before Hydra
    made it, read before it does, so that a run refused before training removes only what this
    process created there, never a folder or a file that existed."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _before.clear()
        with contextlib.suppress(Exception):  # an unresolvable dir: nothing is removed later
            run_dir = Path(os.path.abspath(str(OmegaConf.select(config, "hydra.run.dir"))))
            missing = [d for d in [run_dir, *run_dir.parents] if not d.exists()]
            first_new = missing[-1] if missing else None  # the topmost folder Hydra will make
            _before[run_dir] = (first_new, _entries(run_dir))


_before: dict[Path, tuple[Path | None, set[str]]] = {}  # run dir -> (first folder made, entries)


def _entries(run_dir: Path) -> set[str]:
    """What a run dir holds where Hydra writes before the task: its top level and `.hydra/`."""
    found = set()
    for folder in (run_dir, run_dir / ".hydra"):
        if folder.is_dir():
            found |= {str(p.relative_to(run_dir)) for p in folder.iterdir()}
    return found


def _discard_untouched(run_dir: Path) -> None:
    """Remove what Hydra wrote before the task (.hydra/, the job log) into a run dir, and the
    folders it made for it; only what was not there before (RunDirRecord), nothing else."""
    run_dir = Path(os.path.abspath(run_dir))
    if run_dir not in _before:
        return  # not known to be ours: left as it is
    first_new, before = _before[run_dir]
    new = sorted(_entries(run_dir) - before, key=len, reverse=True)  # .hydra/x before .hydra
    if not all(name.startswith(".hydra") or name.endswith(".log") for name in new):
        return  # something else was written: the run did start
    for name in new:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    folder = run_dir
    while first_new is not None and folder.is_relative_to(first_new):
        try:
            folder.rmdir()  # only when empty: another run may share a folder made meanwhile
        except OSError:
            return
        folder = folder.parent


def _hydra_run_dir(error: BaseException) -> Path | None:
    """The run dir of the single run `error` ended: Hydra resets its HydraConfig when run_job
    fails (a full disk while it writes .hydra/), so it is read from run_job's frame."""
    for frame, _ in traceback.walk_tb(error.__traceback__):
        if frame.f_code.co_name == "run_job" and "hydra.core" in frame.f_globals["__name__"]:
            config = frame.f_locals.get("config")
            with contextlib.suppress(Exception):
                if config.hydra.mode == RunMode.RUN:
                    return Path(config.hydra.runtime.output_dir)
    return None


def _knob_rules() -> dict:
    sweeper = config.knobs(config.LenetOptunaSweeperConf, "hydra.sweeper.")
    return {**config.knobs(config.RunConfig), **sweeper}


def _plugin_missing(text: str) -> UserError | None:
    """`hydra/launcher=slurm` without hydra-submitit-launcher: which extra installs it."""
    missing = re.search(
        r"(?:In 'hydra/launcher/(\w+)': )?Could not (?:find|load) 'hydra/launcher/(\w+)'", text
    )
    chosen = missing and (missing[1] or missing[2])
    if not chosen or not config.LAUNCHERS.get(chosen, (None, None))[1]:
        return None
    package, extra = config.LAUNCHERS[chosen][1]
    return UserError(
        f"hydra/launcher={chosen} needs {package}, which is not installed: "
        f"pip install 'lenet_sweep[{extra}]' (in a checkout: pip install -e '.[{extra}]')"
    )


def _params_key_error(error: BaseException) -> UserError | None:
    """`hydra.sweeper.params={lrr: ...}`: Hydra adds no key to a map of its own config (struct),
    so a search over a key the default search lacks is refused at composition: say which."""
    for seen in errors.causes(error):
        if found := re.search(r"full_key: hydra\.sweeper\.params\.(\S+)", str(seen)):
            key, known = found[1], config.keys(config.RunConfig)
            if key in known:
                return UserError(
                    f"hydra.sweeper.params: {key} is not in the default search, and Hydra adds no "
                    f"key to its own config's maps; search it on the command line: {key}=<sweep>"
                )
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            return UserError(f"hydra.sweeper.params: {key} is not a key of the config{hint}")
    return None


def _override_error(error: BaseException) -> UserError | None:
    """An unknown key (`lrr=0.1`: the closest knob, not Hydra's `+lrr=0.1`, which would train
    with lr 0.9) or an override Hydra's grammar cannot read (quote it), as one line."""
    text = str(error)
    if unknown := re.search(r"Could not override '([^']+)'.*? use \+(\S+)", text, re.DOTALL):
        key, given = unknown[1], unknown[2]
        if key == "hydra.sweeper.repeats":  # gone with the run knob seeds (one release's note)
            n = given.partition("=")[2]
            return UserError(
                f"{given}: gone; seeds={n} is the run knob now (each trial trains its seeds "
                "side by side, as a single run does)"
            )
        schema = config.keys(config.RunConfig)
        schema += config.keys(config.LenetOptunaSweeperConf, "hydra.sweeper.")
        close = difflib.get_close_matches(key, schema, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        if not close and not key.startswith("hydra."):
            hint = f"; to add a new key, give +{given}"
        return UserError(f"{given}: no such key in the config{hint}")
    if missing := _plugin_missing(text):
        return missing
    if (bad := re.match(r"LexerNoViableAltException: (.*)", text)) and not bad[1].isascii():
        return UserError(
            f"cannot read the override {bad[1].strip()!r}: Hydra's grammar reads unquoted values "
            """in ASCII; quote it, e.g. 'key="é"'"""
        )
    if bad:
        return UserError(
            f"cannot read the override {bad[1].strip()!r}: in Hydra's grammar ; and spaces end a "
            """value; quote it, e.g. 'key="a/b;c"'"""
        )
    return None


def cli() -> None:
    try:
        _cli()
    except SystemExit as e:
        speed.leave(e.code)
    speed.leave(0)


def _cli() -> None:
    # Hydra prints its own errors (unknown key, missing option) over several lines with a
    # traceback hint; with HYDRA_FULL_ERROR set it raises them instead, and we print one line.
    # The user's own setting decides whether we show tracebacks.
    errors.show_tracebacks = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    if wrong := speed.check_env():
        exit_with(UserError(wrong))
    backend.configure_env()
    try:
        main()
    except (HydraException, OmegaConfBaseException) as e:
        found = config.knob_error(e, _knob_rules()) or _params_key_error(e)
        exit_with(found or _override_error(e) or e)
    except PermissionError as e:  # e.g. Hydra making the run dir in a read-only outputs/
        exit_with(
            UserError(
                f"cannot write {e.filename} ({e.strerror}); make it writable or set "
                "hydra.run.dir (hydra.sweep.dir with -m) to a writable folder"
            )
        )
    except BrokenPipeError:  # `--help | head`: the reader is gone, as for any command
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(128 + signal.SIGPIPE)
    except Exception as e:  # noqa: BLE001 - an outage (full disk, store away) as one line
        run_dir = _hydra_run_dir(e)
        if (down := errors.outage(e, run_dir)) is None:
            raise
        if run_dir and run_dir.is_dir():
            with contextlib.suppress(OSError):  # it holds nothing yet: leave no empty run dir
                _discard_untouched(run_dir)
        exit_with(down)
    except KeyboardInterrupt as e:
        sys.stderr.write(
            f"interrupted ({e or 'Ctrl-C'}): MLflow runs ended KILLED, checkpoint kept; "
            + (
                f"continue with resume={e.run_dir}\n"
                if getattr(e, "run_dir", None)
                else "rerun with resume=<run dir> to continue (a sweep: the same command)\n"
            )
        )
        sys.exit(128 + (e.signum if isinstance(e, Terminated) else signal.SIGINT))
