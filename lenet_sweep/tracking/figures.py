"""Figures logged to MLflow: a run's training curves, a sweep's Optuna plots."""

from __future__ import annotations

import logging
import os
import tempfile
import warnings

log = logging.getLogger("lenet_sweep.sweep")


def _agg():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on workers and CI


def curves_figure(history: list[dict]):
    """The seed's Animator at epoch resolution: train loss, train acc, test acc vs epoch."""
    _agg()
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 3.2), dpi=120)
    # Margins fixed to what tight_layout finds for this figure, which it would search each time.
    fig.subplots_adjust(left=0.105, right=0.93, bottom=0.18, top=0.953)
    ax = fig.add_subplot()
    epochs = [h["epoch"] for h in history]
    marker = "o" if len(epochs) == 1 else None  # one epoch is a point: a line would not show
    ax.plot(epochs, [h["train_loss"] for h in history], "-", marker=marker, label="train loss")
    ax.plot(epochs, [h["train_acc"] for h in history], "m--", marker=marker, label="train acc")
    ax.plot(epochs, [h["test_acc"] for h in history], "g-.", marker=marker, label="test acc")
    if "val_acc" in history[0]:  # a sweep's trial: what it was tuned on
        val = [h["val_acc"] for h in history]
        ax.plot(epochs, val, "c:", marker=marker, label="val acc")
    ax.set_xlabel("epoch")
    if marker:
        ax.set_xlim(epochs[0] - 0.5, epochs[0] + 0.5)
        ax.set_xticks(epochs)
    else:
        ax.set_xlim(epochs[0], epochs[-1])
    ax.grid(True)
    ax.legend()
    return fig


def draw_study_plots(study, objectives: list[str], folder: str) -> dict[str, str | None]:
    """Optuna's plots of `study` as PNGs in `folder`, saved as MLflow's log_figure saves them:
    history, parallel coordinates and importances of the first objective, and the Pareto front
    when there are several. Returns {file name: None if drawn, else why it was skipped}."""
    _agg()
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    first = {} if len(objectives) == 1 else {"target": lambda t: t.values[0]}
    plots = {
        "optimization_history.png": lambda: ovm.plot_optimization_history(
            study, **first, target_name=objectives[0]
        ),
        "parallel_coordinate.png": lambda: ovm.plot_parallel_coordinate(
            study, **first, target_name=objectives[0]
        ),
        "param_importances.png": lambda: ovm.plot_param_importances(
            study, **first, target_name=objectives[0]
        ),
    }
    if len(objectives) > 1:
        plots["pareto_front.png"] = lambda: ovm.plot_pareto_front(study, target_names=objectives)
    outcome: dict[str, str | None] = {}
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():  # "experimental (supported from v2.2.0)": noise
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                ax = plot()
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.savefig(os.path.join(folder, name))
            plt.close(fig)
            outcome[name] = None
        except Exception as e:  # noqa: BLE001 - e.g. importances need >= 2 complete trials
            outcome[name] = str(e).splitlines()[0] if str(e) else repr(e)
    return outcome


def log_study_plots(run, study, objectives: list[str]) -> None:
    """Optuna's plots under plots/ of `run` (`draw_study_plots`)."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, skipped in draw_study_plots(study, objectives, tmp).items():
            if skipped:
                log.info("plot %s skipped: %s", name, skipped)
            else:
                run.log_artifact(os.path.join(tmp, name), "plots")
