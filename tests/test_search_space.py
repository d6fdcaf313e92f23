import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from lenet_sweep.errors import UserError
from lenet_sweep.sweep.search_space import grid_choices, parse


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("lr=tag(log, interval(0.01, 3.0))", FloatDistribution(0.01, 3.0, log=True)),
        ("lr=interval(0.1, 0.5)", FloatDistribution(0.1, 0.5)),
        ("epochs=range(1, 21)", IntDistribution(1, 20)),  # end exclusive, as in Hydra
        ("epochs=range(2, 11, 3)", IntDistribution(2, 8, step=3)),
        ("epochs=int(interval(1, 20))", IntDistribution(1, 20)),
        ("batch_size=tag(log, int(interval(32, 512)))", IntDistribution(32, 512, log=True)),
        ("model=choice(lenet, lenet_relu)", CategoricalDistribution(["lenet", "lenet_relu"])),
        ("lr=choice(0.1, 0.9)", CategoricalDistribution([0.1, 0.9])),
    ],
)
def test_grammar_maps_to_optuna_distribution(override, expected):
    space, fixed = parse([override])
    assert list(space.values()) == [expected] and fixed == {}


def test_fixed_values_and_later_arguments_win():
    space, fixed = parse(
        ["lr=tag(log, interval(0.01, 3.0))", "epochs=range(1, 21)", "epochs=3", "seed=1"]
    )
    assert list(space) == ["lr"] and fixed == {"epochs": "3", "seed": "1"}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lr=interval(3.0, 0.01)", "lr=interval(3.0, 0.01): empty interval; give low < high"),
        ("lr=interval(0.5, 0.5)", "empty interval"),
        ("epochs=range(5, 5)", "epochs=range(5, 5, 1): empty range"),
        ("lr=tag(log, interval(0.0, 1.0))", "log scale needs low > 0"),
    ],
)
def test_empty_or_bad_spaces_are_user_errors(override, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse([override])


def test_grid_needs_discrete_space():
    space, _ = parse(["lr=choice(0.1, 0.3)", "epochs=range(2, 6, 2)"])
    assert grid_choices(space) == {"lr": [0.1, 0.3], "epochs": [2, 4]}
    with pytest.raises(UserError, match="grid sampler needs a discrete search space"):
        grid_choices(parse(["lr=interval(0.1, 0.3)"])[0])
