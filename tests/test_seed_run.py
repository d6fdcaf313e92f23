"""The seed's own run: 10 epochs, lr 0.9, whole data set, CPU. CI runs it (-m slow)."""

import pytest

from lenet_sweep.job import run as app


@pytest.mark.slow
def test_default_ten_epochs_land_in_the_seed_band(make_cfg):
    cfg = make_cfg("data.train_size=null", "data.test_size=null", "epochs=10", "lr=0.9")
    test_acc = app.run(cfg)["test_acc"]
    assert 0.76 <= test_acc <= 0.83  # d2l's published runs
