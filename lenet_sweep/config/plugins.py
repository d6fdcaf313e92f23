"""The plugins' settings as structured configs their packages store in Hydra's ConfigStore
(hydra_plugins/): the sweeper's (`hydra.sweeper.*`) with the samplers and pruners it offers by
name, and the fused launcher's (`hydra.launcher.*`)."""

from dataclasses import dataclass, field
from typing import Any

from lenet_sweep.config.knobs import knob


@dataclass
class LenetOptunaSweeperConf:
    """The official hydra-optuna-sweeper's keys, plus pruner, heartbeat, objectives, warm starts
    and the one point an app plugs its additions in (`app`), off unless an app sets it."""

    _target_: str = "hydra_plugins.lenet_sweep_optuna.sweeper.LenetOptunaSweeper"
    defaults: list[Any] = field(
        default_factory=lambda: ["_self_", {"sampler": "tpe"}, {"pruner": "none"}]
    )
    sampler: Any = None  # hydra/sweeper/sampler/*: built by Hydra (grid: a partial)
    direction: Any = knob(
        "maximize", "maximize, minimize or a list of them", "for the objectives, a list: one each"
    )
    # null: the job returns the value(s) itself (one number, or one per direction).
    objectives: list[str] | None = knob(
        None, "null or a list of metric names", "the job's metrics to optimise, in order"
    )
    storage: str | None = knob(
        None,
        "null, an Optuna RDB URL or journal:///<file>",
        "same storage + study_name = the same study",
    )
    study_name: str | None = knob(None, "null or a plain name", "null: the app's job name")
    n_trials: int = knob(
        20, "an integer >= 1", "the study's total; a rerun runs what is left", minimum=1
    )
    n_jobs: int = knob(
        1, "an integer >= 1", "trials in flight at once (fused: the group's slots)", minimum=1
    )
    batches: bool = knob(
        False,
        "true or false",
        "true: the next n_jobs trials once all have ended; false: fused refills each freed slot",
    )
    max_failure_rate: float = knob(
        0.5, "a number in [0, 1]", "stop once failed trials pass it", minimum=0, maximum=1
    )
    params: dict[str, str] | None = knob(
        None, "a map of key: sweep", "the search space, e.g. {lr: 'interval(0.1, 1)'}"
    )
    custom_search_space: str | None = None  # "module.fn": fn(cfg, trial) suggests extra params
    enqueue: list[dict[str, Any]] | None = knob(
        None, "null or a list of maps", "parameter sets tried first, once per study"
    )
    pruner: Any = None  # hydra/sweeper/pruner/*
    heartbeat_interval: int = knob(
        10, "an integer >= 1", "seconds between a worker's signs of life", minimum=1
    )
    grace_period: int = knob(
        30, "an integer >= 1", "seconds after which a silent worker's trials fail", minimum=1
    )
    # range(a, b) ends: false = Hydra's grammar (b excluded); true = the official plugin's (b in)
    inclusive_range_end: bool = False
    refit_seeds: int = knob(
        3,
        "an integer >= 0",
        "the study's best trained again with this many fresh seeds, all training images, "
        "and tested (the answer); 0: off",
        minimum=0,
    )
    register_model: str | None = knob(
        None, "null or a name", "the best trial's model into MLflow's Model Registry as this"
    )
    # "module.Class", a lenet_sweep.sweep.app.SweepApp: what the app adds to the sweep (its
    # checks, its records of the study and the trials); null: nothing, the study alone
    app: str | None = None


# hydra/launcher=<name>: what it does, and the package (and this project's extra) it needs.
LAUNCHERS = {
    "basic": ("one trial after another, in the sweep's process", None),
    "fused": ("n_jobs trials trained as one model on one device, freed slots refilled", None),
    "joblib": ("trials in parallel local processes", ("hydra-joblib-launcher", "joblib")),
    "submitit_local": ("trials as local submitit jobs", ("hydra-submitit-launcher", "slurm")),
    "slurm": ("trials as SLURM jobs, through submitit", ("hydra-submitit-launcher", "slurm")),
    "ray": ("trials as tasks of a local Ray", ("hydra-ray-launcher", "ray")),
    "ray_cluster": ("trials as tasks on a Ray cluster", ("hydra-ray-launcher", "ray")),
}

# How a sweep hands its trials to each launcher (lenet_sweep.sweep.dispatch): Hydra's "batches"
# (n_jobs launched, told once all end), "in_flight:<adapter>" (each trial alone, the next the
# moment one ends: sweep/in_flight.py's adapters, built on each plugin's internals), "streamed"
# (the launcher asks for each trial). A launcher not named here gets batches, said in one line.
DISPATCH = {
    "basic": "batches",
    "fused": "streamed",
    "joblib": "in_flight:joblib",
    "submitit_local": "in_flight:submitit",
    "submitit_slurm": "in_flight:submitit",
    "slurm": "in_flight:submitit",
    "ray": "in_flight:ray",
    "ray_cluster": "in_flight:ray",
}

# Samplers and pruners by name: hydra/sweeper/sampler=<name>, hydra/sweeper/pruner=<name>.
SAMPLERS = {
    "tpe": {
        "_target_": "optuna.samplers.TPESampler",
        "seed": None,
        "n_startup_trials": 10,
        "multivariate": False,
    },
    "random": {"_target_": "optuna.samplers.RandomSampler", "seed": None},
    "cmaes": {"_target_": "optuna.samplers.CmaEsSampler", "seed": None, "n_startup_trials": 1},
    "gp": {"_target_": "optuna.samplers.GPSampler", "seed": None, "n_startup_trials": 10},
    "qmc": {
        "_target_": "optuna.samplers.QMCSampler",
        "seed": None,
        "qmc_type": "sobol",
        "scramble": True,
    },
    "nsgaii": {"_target_": "optuna.samplers.NSGAIISampler", "seed": None, "population_size": 50},
    # The grid is built from the search space (choice/range only): Hydra hands over a partial.
    "grid": {"_target_": "optuna.samplers.GridSampler", "_partial_": True, "seed": None},
}
PRUNERS = {
    "none": {},  # every trial runs all its steps
    "median": {
        "_target_": "optuna.pruners.MedianPruner",
        "n_startup_trials": 5,
        "n_warmup_steps": 1,
        "interval_steps": 1,
    },
    "percentile": {
        "_target_": "optuna.pruners.PercentilePruner",
        "percentile": 25.0,
        "n_startup_trials": 5,
        "n_warmup_steps": 1,
    },
    "hyperband": {
        "_target_": "optuna.pruners.HyperbandPruner",
        "min_resource": 1,
        "max_resource": "auto",
        "reduction_factor": 3,
    },
    # prunes a trial whose reported value is below `lower` after n_warmup_steps
    "threshold": {"_target_": "optuna.pruners.ThresholdPruner", "lower": 0.5, "n_warmup_steps": 0},
}


@dataclass
class FusedLauncherConf:
    """`hydra/launcher=fused`: the sweeper's batch of trials trained together on one device."""

    _target_: str = "hydra_plugins.lenet_sweep_fused.launcher.FusedLauncher"
    # most trials in one group (memory: K x batch); null: no limit
    max_group: int | None = knob(
        None, "null or an integer >= 1", "fused: most trials in one group", minimum=1
    )
    devices: Any = knob(
        None, "null, all or a list of cpu, cuda, cuda:N", "fused: a worker a device, one study"
    )
    engine: str = knob(
        "local",
        "local, submitit_local, slurm or ray",
        "fused: where the devices' workers run",
        choices=("local", "submitit_local", "slurm", "ray"),
    )
    submitit: Any = knob(None, "null or a map", "fused workers on submitit: its parameters")
    ray: Any = knob(None, "null or a map", "fused workers on Ray: {init: ray.init's arguments}")
