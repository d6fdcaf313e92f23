"""A sweep's set-up from its settings: directions and objectives, defaults that need the app,
the checks before anything starts, the search space, sampler, pruner, the study, warm starts.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import math
import re
import uuid
from collections.abc import Callable
from pathlib import Path

import optuna
from omegaconf import DictConfig, OmegaConf

from lenet_sweep import OUTPUTS_DIR
from lenet_sweep.config.knobs import check_knobs
from lenet_sweep.config.plugins import LenetOptunaSweeperConf
from lenet_sweep.db_files import (
    check_intact,
    check_journal,
    check_sqlite,
    check_writable_dir,
    sqlite_path,
)
from lenet_sweep.errors import UserError, describe, mask_url, outage
from lenet_sweep.sweep import protocol
from lenet_sweep.sweep.search_space import grid_choices, parse

log = logging.getLogger("lenet_sweep.sweep")
_ABSENT = object()


def _close(key: str, among) -> str:
    """`; did you mean lr?` for the closest of `among`'s keys, if any is close."""
    close = difflib.get_close_matches(key, [str(k) for k in among], n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


# A study's name names its sweep dir too (conf/config.yaml): a plain name keeps it inside.
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_plain_name(key: str, name: str, example: str) -> None:
    if not PLAIN_NAME.fullmatch(name):
        shown = name if len(name) <= 60 else f"{name[:60]}..."
        raise UserError(
            f"{key}={shown}: must be a plain name (letters, digits, '.', '_', '-'; at most 128 "
            f"characters), e.g. {key}={example}"
        )


def _check_driver(url: str) -> None:
    """A database URL's driver is installed (sqlalchemy loads it only when it connects)."""
    if sqlite_path(url) or url.startswith("journal:///"):
        return
    import sqlalchemy

    try:
        sqlalchemy.engine.make_url(url).get_dialect().import_dbapi()
    except ImportError as e:
        raise UserError(
            f"Optuna storage {mask_url(url)}: its database driver is not installed "
            f"({describe(e)}); pip install it (psycopg for postgresql, mysqlclient or PyMySQL "
            "for mysql), or fix hydra.sweeper.storage"
        ) from e
    except Exception:  # noqa: BLE001 - a URL sqlalchemy cannot read: opening it says why
        return


_CLAIM = ".study.json"  # in a sweep dir: the study whose trials it holds (name, uid)


def _claimed(sweep_dir: Path) -> dict | None:
    try:
        return json.loads((sweep_dir / _CLAIM).read_text())
    except (OSError, ValueError):
        return None


class SweepSetup:
    """hydra.sweeper.* + the app's composed config -> what the sweep loop needs."""

    def __init__(
        self,
        settings: LenetOptunaSweeperConf,
        config: DictConfig,
        group_options: Callable[[str], list[str]],
    ):
        self.settings, self.config = settings, config
        self.group_options = group_options  # a config group's options, from Hydra's loader
        direction = settings.direction
        self.directions = [direction] if isinstance(direction, str) else list(direction)
        # The job's metrics to optimise, the first one per direction (an app's plain return
        # values are value, or value_0, value_1, ...).
        n = len(self.directions)
        named = list(
            settings.objectives or (["value"] if n == 1 else [f"value_{i}" for i in range(n)])
        )
        self.objectives = named[:n]
        self.sweep_dir = Path(config.hydra.sweep.dir)
        # Defaults that need the app: a study named after it, stored beside its jobs.
        settings.study_name = settings.study_name or config.hydra.job.name
        self.own_storage = settings.storage is None
        if self.own_storage:
            settings.storage = f"sqlite:///{self.sweep_dir.resolve() / 'optuna.db'}"

    def check(self, arguments: list[str], app_check) -> tuple[dict, dict]:
        """Everything a trial would fail on, refused before any study, run or folder exists
        (`app_check(space, group_options)`: the app's own); returns the search space and the
        fixed values."""
        check_knobs(self.settings, LenetOptunaSweeperConf, "hydra.sweeper.")
        check_plain_name("hydra.sweeper.study_name", str(self.settings.study_name), "fmnist-a")
        if self.settings.register_model is not None:  # a registered model's name, in URIs too
            name = str(self.settings.register_model)
            check_plain_name("hydra.sweeper.register_model", name, "lenet-best")
        self.check_objectives()
        space, fixed = self.search_space(arguments)
        app_check(space, self.group_options)  # the app's own: its knobs' types and ranges, say
        own_dir = self.sweep_dir if self.own_storage else OUTPUTS_DIR
        _check_driver(self.settings.storage)
        check_journal(self.settings.storage)
        check_sqlite(self.settings.storage, "Optuna storage", "hydra.sweeper.storage", own_dir)
        check_intact(self.settings.storage, "Optuna storage")
        self.check_sweep_dir()
        check_writable_dir(
            self.sweep_dir,
            f"hydra.sweep.dir={self.sweep_dir}",
            "make it writable or set hydra.sweep.dir to a writable folder",
        )
        return space, fixed

    def check_objectives(self) -> None:
        if not self.directions or not set(self.directions) <= {"maximize", "minimize"}:
            raise UserError(
                f"hydra.sweeper.direction={self.settings.direction}: must be "
                "maximize, minimize or a list of them"
            )
        if len(self.objectives) != len(self.directions):
            raise UserError(
                f"hydra.sweeper.objectives={self.objectives}: name one metric per "
                f"direction ({len(self.directions)}), e.g. [val_acc, train_time_s]"
            )
        if len(self.directions) > 1 and not isinstance(self.pruner(), optuna.pruners.NopPruner):
            raise UserError(
                "hydra.sweeper.pruner: Optuna cannot prune a study with several "
                "objectives; use hydra/sweeper/pruner=none or one direction"
            )

    def search_space(self, arguments: list[str]):
        params = self.settings.params or {}
        params_conf = [f"{k}={v}" for k, v in params.items()]
        space, fixed = parse(
            params_conf + list(arguments), inclusive_range_end=self.settings.inclusive_range_end
        )
        if not space and not self.settings.custom_search_space:
            raise UserError(
                "the search space is empty; give hydra.sweeper.params or overrides such as "
                "'lr=tag(log, interval(0.01, 3.0))'"
            )
        for key in params:  # the command line's keys Hydra checks as it composes; these not
            if OmegaConf.select(self.config, key, default=_ABSENT) is _ABSENT:
                raise UserError(
                    f"hydra.sweeper.params: {key} is not a key of the config{_close(key, self.config)}"
                )
        for given in self.settings.enqueue or []:
            if unknown := sorted(set(given) - set(space)):
                raise UserError(
                    f"hydra.sweeper.enqueue: {unknown[0]} is not searched (the search space: "
                    f"{', '.join(space)}){_close(unknown[0], space)}"
                )
        return space, fixed

    def sampler(self, space) -> optuna.samplers.BaseSampler:
        # Hydra instantiates the sweeper recursively: sampler and pruner arrive built (grid partial).
        sampler = self.settings.sampler
        if not sampler:
            return optuna.samplers.TPESampler()
        if isinstance(sampler, functools.partial):  # grid: needs the space listed
            if sampler.func is optuna.samplers.GridSampler:
                grid = grid_choices(space)
                size = math.prod(len(v) for v in grid.values())
                if size < self.settings.n_trials:
                    log.info(
                        "grid has %d points: n_trials %d -> %d", size, self.settings.n_trials, size
                    )
                    self.settings.n_trials = size
                return sampler(grid)
            sampler = sampler()
        return sampler

    def enqueue(self, study: optuna.Study) -> None:
        """Warm start: hydra.sweeper.enqueue's parameter sets go first, once per study (a
        resumed sweep finds them enqueued already). Call under the ask lock."""
        if self.settings.enqueue and not study.user_attrs.get(protocol.ENQUEUED):
            for params in self.settings.enqueue:
                study.enqueue_trial(dict(params), skip_if_exists=True)
            study.set_user_attr(protocol.ENQUEUED, len(self.settings.enqueue))

    def pruner(self) -> optuna.pruners.BasePruner:
        if not isinstance(self.settings.pruner, optuna.pruners.BasePruner):
            return optuna.pruners.NopPruner()  # pruner: none composes to an empty node
        return self.settings.pruner

    def open_study(self, storage, sampler) -> optuna.Study:
        """The study (created on first use), once the sweep dir is known to be its own."""
        claimed = _claimed(self.sweep_dir)
        if claimed and self.settings.study_name not in optuna.get_all_study_names(storage):
            raise UserError(
                f"hydra.sweep.dir={self.sweep_dir} holds the trials of a study "
                f"{claimed['study_name']} that {mask_url(self.settings.storage)} no longer has; "
                "a new study there would overwrite them: give it another hydra.sweep.dir"
            )
        study = self._open_study(storage, sampler)
        uid = study.user_attrs.get(protocol.SWEEP_UID) or uuid.uuid4().hex
        if claimed and claimed.get("uid") != uid:
            raise UserError(
                f"hydra.sweep.dir={self.sweep_dir} holds the trials of another study "
                f"{claimed['study_name']}; give this one another hydra.sweep.dir"
            )
        if not claimed:
            study.set_user_attr(protocol.SWEEP_UID, uid)
            self.sweep_dir.mkdir(parents=True, exist_ok=True)
            record = {"study_name": study.study_name, "uid": uid}
            (self.sweep_dir / _CLAIM).write_text(json.dumps(record))
        return study

    def check_sweep_dir(self) -> None:
        """A sweep dir belongs to one study: another study's is refused before anything."""
        claimed = _claimed(self.sweep_dir)
        if claimed and claimed["study_name"] != self.settings.study_name:
            raise UserError(
                f"hydra.sweep.dir={self.sweep_dir} holds the trials of study "
                f"{claimed['study_name']}; give study {self.settings.study_name} a dir of its "
                "own (the default, outputs/multirun/<study_name>, is one)"
            )

    def _open_study(self, storage, sampler) -> optuna.Study:
        try:
            return optuna.create_study(
                study_name=self.settings.study_name,
                storage=storage,
                sampler=sampler,
                pruner=self.pruner(),
                directions=self.directions,
                load_if_exists=True,
            )
        except Exception as e:  # noqa: BLE001
            if down := outage(e, sqlite_path(self.settings.storage)):
                raise down from e
            raise UserError(
                f"cannot open study {self.settings.study_name!r} in "
                f"{mask_url(self.settings.storage)} ({describe(e)}); "
                "fix hydra.sweeper.storage / study_name"
            ) from e
