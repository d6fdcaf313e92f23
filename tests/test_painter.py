"""The training-curves PNG drawn by the helper process: the same bytes, in-process when it can't."""

import os
import signal
import subprocess
import sys
import time

HISTORY = [{"epoch": e, "test_acc": 0.5 + e / 10, "train_loss": 1 / e, "train_acc": 0.4 + e / 10}
           for e in (1, 2, 3)]  # fmt: skip

# Draws the curves with the helper, then (helper gone, as `mode` says) in this process; prints
# whether matplotlib was imported here after each, and the helper's pid.
PROGRAM = f"""
import os, sys, time
from lenet_sweep import painter
painter.start()
pid = painter._helper.pid
with painter.drawing({HISTORY!r}, sys.argv[1] + "/helper.png"):
    pass
print("helper", "matplotlib" in sys.modules, pid, flush=True)
if sys.argv[2] == "killed":
    os.kill(pid, 9)
    painter._helper.wait()
elif sys.argv[2] == "stopped":
    painter.stop()
elif sys.argv[2] == "wait":
    time.sleep(60)
with painter.drawing({HISTORY!r}, sys.argv[1] + "/here.png"):
    pass
print("here", "matplotlib" in sys.modules, flush=True)
"""


def _run(tmp_path, mode: str) -> list[list[str]]:
    proc = subprocess.run([sys.executable, "-c", PROGRAM, str(tmp_path), mode],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return [line.split() for line in proc.stdout.splitlines()]


def _gone(pid: int, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_the_helper_draws_the_same_png_and_a_run_without_it_draws_its_own(tmp_path):
    (_, helper_imported, pid), (_, here_imported) = _run(tmp_path, "stopped")
    assert helper_imported == "False" and here_imported == "True"  # drawn elsewhere, then here
    helper_png, here_png = (
        (tmp_path / "helper.png").read_bytes(),
        (tmp_path / "here.png").read_bytes(),
    )
    assert helper_png.startswith(b"\x89PNG") and helper_png == here_png
    assert _gone(int(pid))


def test_a_helper_that_died_leaves_the_run_drawing_in_process(tmp_path):
    (_, _, pid), (_, here_imported) = _run(tmp_path, "killed")
    assert here_imported == "True"
    assert (tmp_path / "here.png").read_bytes() == (tmp_path / "helper.png").read_bytes()


def test_the_helper_leaves_with_its_run_however_it_ends(tmp_path):
    (_, _, pid), _ = _run(tmp_path, "exit")  # an ordinary exit stops it (atexit)
    assert _gone(int(pid), within_s=0.5)
    proc = subprocess.Popen([sys.executable, "-c", PROGRAM, str(tmp_path), "wait"],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    pid = int(proc.stdout.readline().split()[2])
    proc.send_signal(signal.SIGKILL)  # no atexit: the helper sees its stdin close
    proc.wait()
    proc.stdout.close()
    assert _gone(pid)


# The block runs while the helper draws: the PNG appears before the block ends. A block that
# raises leaves no PNG drawn here and the helper in step for the next request.
OVERLAP = f"""
import os, sys, time
from lenet_sweep import painter
painter.start()
path = sys.argv[1] + "/{{}}.png"
with painter.drawing({HISTORY!r}, path.format("during")):
    deadline = time.monotonic() + 30
    while not os.path.exists(path.format("during")) and time.monotonic() < deadline:
        time.sleep(0.01)
    print("seen in the block", os.path.exists(path.format("during")))
try:
    with painter.drawing({HISTORY!r}, path.format("failed")):
        raise RuntimeError("the model write failed")
except RuntimeError:
    pass
with painter.drawing({HISTORY!r}, path.format("after")):
    pass
print("after", painter._helper is not None, "matplotlib" in sys.modules)
"""


def test_the_curves_are_drawn_while_the_run_writes_and_a_failed_block_keeps_the_helper(tmp_path):
    proc = subprocess.run([sys.executable, "-c", OVERLAP, str(tmp_path)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["seen in the block True", "after True False"]
    during, after = (tmp_path / "during.png").read_bytes(), (tmp_path / "after.png").read_bytes()
    assert during == after and during.startswith(b"\x89PNG")


# A sweep's plots: drawn by the helper (started for them) from a copy of the study, then (helper
# gone, as `mode` says) in this process; prints the names drawn and whether sklearn and
# matplotlib were imported here after each.
STUDY_PROGRAM = """
import os, sys
import optuna
from lenet_sweep import painter
optuna.logging.set_verbosity(optuna.logging.WARNING)
painter.start(study_plots=True)
objectives = sys.argv[3].split(",")
study = optuna.create_study(directions=["maximize"] * len(objectives))
space = {"lr": optuna.distributions.FloatDistribution(0.01, 1.0, log=True),
         "epochs": optuna.distributions.IntDistribution(1, 10)}
for i in range(int(sys.argv[4])):
    trial = study.ask(space)
    if i == 3:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    elif i == 4:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    else:
        study.tell(trial, [(i * 7 % 11) / 11 + j for j in range(len(objectives))])
study.ask()  # another worker's trial, still running
if sys.argv[2] == "frozen":  # a helper that takes no more requests
    os.kill(painter._helper.pid, 19)  # SIGSTOP
    painter.ANSWER_TIMEOUT_S = 1.0
for where in ("helper", "here"):
    if sys.argv[2] != "no folder":  # else every plot fails to save
        os.makedirs(sys.argv[1] + "/" + where)
    drawn = painter.study_plots(study, objectives, sys.argv[1] + "/" + where)
    names = [name for name, why in drawn.items() if why is None]
    skipped = [name for name, why in drawn.items() if why] or ["-"]
    print(where, ",".join(names), "sklearn" in sys.modules, "matplotlib" in sys.modules,
          ",".join(skipped), flush=True)
    if where == "helper" and sys.argv[2] == "killed":
        os.kill(painter._helper.pid, 9)
        painter._helper.wait()
    elif where == "helper":
        painter.stop()
"""


def _plots(tmp_path, mode: str, objectives: str, trials: int) -> list[list[str]]:
    proc = subprocess.run([sys.executable, "-c", STUDY_PROGRAM, str(tmp_path), mode, objectives,
                           str(trials)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return [line.split() for line in proc.stdout.splitlines()]


def test_a_sweeps_plots_are_drawn_by_the_helper_as_this_process_draws_them(tmp_path):
    helper, here = _plots(tmp_path, "stopped", "test_acc", 400)  # more than a pipe holds
    names = ["optimization_history.png", "parallel_coordinate.png", "param_importances.png"]
    assert helper == ["helper", ",".join(names), "False", "False", "-"]  # nothing imported here
    assert here == ["here", ",".join(names), "True", "True", "-"]
    for name in names[:2]:  # the importances come from a random forest: compared by name only
        drawn = (tmp_path / "helper" / name).read_bytes()
        assert drawn.startswith(b"\x89PNG") and drawn == (tmp_path / "here" / name).read_bytes()


def test_several_objectives_get_their_pareto_front_and_a_dead_helper_leaves_it_here(tmp_path):
    helper, here = _plots(tmp_path, "killed", "test_acc,train_acc", 12)
    assert helper[1].split(",")[-1] == "pareto_front.png" and helper[2:] == ["False", "False", "-"]
    assert here[1] == helper[1] and here[2:] == ["True", "True", "-"]
    front = (tmp_path / "helper" / "pareto_front.png").read_bytes()
    assert front == (tmp_path / "here" / "pareto_front.png").read_bytes()


def test_a_helper_that_takes_no_request_cannot_hang_the_sweep(tmp_path):
    started = time.monotonic()
    asked, here = _plots(tmp_path, "frozen", "test_acc", 400)
    assert asked[1:] == ["optimization_history.png,parallel_coordinate.png,param_importances.png",
                         "True", "True", "-"]  # drawn here after the write timed out  # fmt: skip
    assert here[1] == asked[1] and time.monotonic() - started < 60


def test_the_plots_the_helper_could_not_draw_are_reported_to_the_sweep_as_here(tmp_path):
    helper, here = _plots(tmp_path, "no folder", "test_acc", 3)
    skipped = "optimization_history.png,parallel_coordinate.png,param_importances.png"
    # none drawn (an empty field), each skipped with its reason, by the helper as here
    assert helper == ["helper", "False", "False", skipped]
    assert here == ["here", "True", "True", skipped]
