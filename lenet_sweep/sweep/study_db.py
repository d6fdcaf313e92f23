"""The study's storage: opening it, the ask lock, heartbeats, repair of dead workers, the budget.

What lets several workers (processes or hosts) share one study without losing or overshooting
trials. The sweep loop (lenet_sweep.sweep) and the job's trial link use only this and Optuna's
public API.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings
from collections.abc import Iterable, Iterator

import optuna
from optuna.trial import FrozenTrial, TrialState

from lenet_sweep.db_files import (
    JOURNAL,
    check_journal,
    check_writable_dir,
    file_lock,
    journal_path,
    sqlite_path,
)
from lenet_sweep.errors import Outage, UserError, causes, describe, mask_url, outage
from lenet_sweep.process import HOST, pid_alive
from lenet_sweep.sweep import protocol

log = logging.getLogger("lenet_sweep.sweep")


# Trials that count toward n_trials; FAIL ones count only when the job itself failed
# (a trial failed because its worker died, an interrupt or an outage is run again).
# Enqueued (WAITING) trials do not: they are the study's first asks, and run.
_BUDGET_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
_PG_ASK_LOCK = 0x1E9E75  # one PostgreSQL advisory lock id for lenet_sweep's ask step


@contextlib.contextmanager
def heartbeat_warnings_off() -> Iterator[None]:
    """Optuna warns of what we do on purpose: heartbeats (an experimental API) kept outside
    optimize(), by our own Heartbeat thread. Scoped to the calls that warn."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        yield


def open_storage(
    url: str, heartbeat_interval: int | None = None, grace_period: int | None = None
) -> optuna.storages.RDBStorage:
    """The study's RDB storage (heartbeats on when given). sqlite: created under its lock;
    other databases: a table-creation race between workers is retried. `journal:///<file>`:
    Optuna's JournalStorage in that file (workers on one host; its lock is not NFS-safe), whose
    trials carry our own heartbeat only (BEAT_AT)."""
    if path := journal_path(url):
        return _journal(path)
    for attempt in range(5):
        try:
            with file_lock(url), heartbeat_warnings_off():
                return optuna.storages.RDBStorage(
                    url,
                    heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period,
                    engine_kwargs={"pool_pre_ping": True},
                )
        except Exception as e:  # noqa: BLE001 - driver errors vary: connection refused, bad URL...
            if missing := next((c for c in causes(e) if isinstance(c, ImportError)), None):
                raise UserError(
                    f"Optuna storage {mask_url(url)}: its database driver is not installed "
                    f"({describe(missing)}); pip install it (psycopg for postgresql, mysqlclient "
                    "or PyMySQL for mysql), or fix hydra.sweeper.storage"
                ) from e
            racing = any(w in str(e) for w in ("already exists", "duplicate key", "UNIQUE"))
            if racing and attempt < 4:
                time.sleep(0.5 * (attempt + 1))
                continue
            if (down := outage(e, sqlite_path(url))) and sqlite_path(url):
                raise down from e  # its disk is full
            if down:
                raise Outage(
                    f"Optuna storage {mask_url(url)} is not reachable ({describe(e)}); start the "
                    "database (or fix hydra.sweeper.storage), then rerun the same command"
                ) from e
            if sqlite_path(url):  # a damaged file: what sqlite says, no database to start
                raise UserError(
                    f"Optuna storage {url} cannot be opened ({describe(e)}); move the file aside "
                    "(a new one is made in its place) or fix hydra.sweeper.storage"
                ) from e
            raise UserError(
                f"Optuna storage {mask_url(url)} is not reachable ({describe(e)}); "
                "start the database or fix hydra.sweeper.storage"
            ) from e
    raise AssertionError("unreachable")


def _journal(path) -> optuna.storages.JournalStorage:
    from optuna.storages.journal import JournalFileBackend

    check_journal(f"{JOURNAL}{path}")
    check_writable_dir(path.parent, "the Optuna journal's folder", "fix hydra.sweeper.storage")
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(f"{JOURNAL}{path}"):
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


@contextlib.contextmanager
def ask_lock(storage: optuna.storages.RDBStorage, url: str) -> Iterator[None]:
    """Serialise count-then-ask across worker processes, so n_trials is never overshot."""
    if url.startswith("postgresql"):
        import sqlalchemy

        with storage.engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": _PG_ASK_LOCK})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_ASK_LOCK})
                conn.commit()
    else:  # sqlite, a journal: a file lock; other databases may overshoot by up to n_jobs - 1
        with file_lock(url):
            yield


def trial_id(storage: optuna.storages.BaseStorage, study_name: str, number: int) -> int:
    """A trial's storage id from its number, through the storage's public API."""
    study_id = storage.get_study_id_from_name(study_name)
    return storage.get_trial_id_from_study_id_trial_number(study_id, number)


def running_trial(study: optuna.Study, storage, number: int) -> optuna.Trial:
    """The live Trial of a job running in another process than the one that asked it.

    Workaround: Optuna hands out Trial objects only from ask() (or optimize()) in the asking
    process, and has no public way to get one by number (optuna/optuna#2987); a job elsewhere
    builds it the way optimize() does. It can go when Optuna offers such a call.
    """
    return optuna.trial.Trial(study, trial_id(storage, study.study_name, number))


def tell(study: optuna.Study, trial: optuna.Trial | int, **kwargs) -> None:
    """study.tell, which GridSampler may end with study.stop(): that raises outside optimize()."""
    try:
        study.tell(trial, skip_if_finished=True, **kwargs)
    except RuntimeError as e:  # the state is stored by then (Optuna writes it in a finally)
        if "Study.stop" not in str(e):
            raise


class Heartbeat(threading.Thread):
    """Records a heartbeat for this worker's running trials (Optuna does this only in optimize)."""

    def __init__(self, storage: optuna.storages.RDBStorage, study_name: str, interval: int):
        super().__init__(daemon=True, name="optuna-heartbeat")
        self.storage, self.study_name, self.interval = storage, study_name, interval
        self.trial_ids: dict[int, int] = {}  # trial number -> storage id
        self.stopped = threading.Event()

    def watch(self, trials: Iterable[optuna.Trial]) -> None:
        """Beat for these trials from now on (none: stop beating), starting with one now."""
        self.trial_ids = {}
        self.add(trials)

    def add(self, trials: Iterable[optuna.Trial]) -> None:
        """Beat for these trials too, starting with one now."""
        new = {t.number: trial_id(self.storage, self.study_name, t.number) for t in trials}
        self.trial_ids.update(new)
        self.beat(new.values())

    def drop(self, number: int) -> None:
        """No more beats for this trial (it ended)."""
        self.trial_ids.pop(number, None)

    def beat(self, ids: Iterable[int] | None = None) -> None:
        for trial_id_ in list(self.trial_ids.values() if ids is None else ids):
            with contextlib.suppress(Exception):  # a missed beat is retried next interval
                self.storage.record_heartbeat(trial_id_)
                # Optuna's beats cannot be read, and a trial it fails takes no reason: our own
                self.storage.set_trial_user_attr(trial_id_, protocol.BEAT_AT, time.time())

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.beat()


def fail_for_rerun(study: optuna.Study, storage, number: int, reason: str) -> None:
    """FAIL a trial that is not at fault (its worker died, an interrupt, an outage) with its
    reason; it does not count toward n_trials, so a new trial takes its place."""
    id_ = trial_id(storage, study.study_name, number)
    with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):  # ended meanwhile
        for key, value in ((protocol.FAIL_REASON, reason[:500]), (protocol.RERUN, True)):
            storage.set_trial_user_attr(id_, key, value)
        tell(study, number, state=TrialState.FAIL)


def fail_dead_workers(study: optuna.Study, storage, grace_period: int | None) -> list[FrozenTrial]:
    """Fail trials left RUNNING by dead workers; returns them (their MLflow runs need ending).
    This host's by their pid; other hosts' by their last beat (BEAT_AT), older than the grace
    period; and Optuna's own check of its heartbeats for what is left."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    now = time.time()
    for trial in running:
        attrs = trial.user_attrs
        host, pid = attrs.get(protocol.WORKER_HOST), attrs.get(protocol.WORKER_PID, 0)
        if host == HOST and not pid_alive(pid):
            fail_for_rerun(study, storage, trial.number, f"worker died: pid {pid} on {host} gone")
        elif grace_period and now - attrs.get(protocol.BEAT_AT, now) > grace_period:
            silent = f"worker died: {host} sent no heartbeat for {grace_period}s"
            fail_for_rerun(study, storage, trial.number, silent)
    with heartbeat_warnings_off():
        optuna.storages.fail_stale_trials(study)  # other hosts: heartbeat older than grace period
    before = {t.number for t in running}
    repaired = [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.number in before
    ]
    if repaired:
        numbers = [t.number for t in repaired]
        log.warning(
            "failed %d stale trial(s) left RUNNING by a dead worker: %s", len(numbers), numbers
        )
    return repaired


def failed_by_job(trial: FrozenTrial) -> bool:
    """FAIL by the trial's own job (not a dead worker, an interrupt or an outage): it counts."""
    attrs = trial.user_attrs
    return (
        trial.state == TrialState.FAIL
        and protocol.FAIL_REASON in attrs
        and not attrs.get(protocol.RERUN)
    )


def budget_used(study: optuna.Study) -> int:
    """Trials that count toward n_trials."""
    trials = study.get_trials(deepcopy=False)
    return sum(1 for t in trials if t.state in _BUDGET_STATES or failed_by_job(t))


def job_failures(study: optuna.Study) -> list[FrozenTrial]:
    """Trials failed by their own job, in order."""
    return [t for t in study.get_trials(deepcopy=False) if failed_by_job(t)]
