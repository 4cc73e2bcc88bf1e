import math

import pytest
import torch
from ignite.engine import Engine

from medfm.workflows import LossComponentsLogger, PrepareSARBatch, ScaleAwareRestorationLoss


def _prediction():
    return {"restored": torch.full((2, 1, 4, 4, 2), 0.5), "scale_logits": torch.tensor([[5.0, 0, 0], [0, 5.0, 0]]),
            "domain_logits": torch.zeros(2, 2)}


def test_weighted_sum_and_components():
    target = {"image": torch.zeros(2, 1, 4, 4, 2), "scale": torch.tensor([0, 2]), "domain": torch.tensor([0, 1])}
    loss = ScaleAwareRestorationLoss(restoration_weight=2.0, scale_weight=0.5, domain_weight=0.1)
    total = loss(_prediction(), target)
    scale_ce = float(torch.nn.functional.cross_entropy(_prediction()["scale_logits"], target["scale"]))
    assert math.isclose(float(total), 2.0 * 0.25 + 0.5 * scale_ce + 0.1 * math.log(2), rel_tol=1e-5)
    assert loss.components["scale_accuracy"] == 0.5 and loss.components["domain_accuracy"] in (0.0, 0.5, 1.0)
    assert math.isclose(loss.components["domain"], math.log(2), rel_tol=1e-5)


def test_prepare_batch_splits_input_and_targets():
    batch = {"image": torch.rand(2, 1, 4, 4, 2), "label": torch.rand(2, 1, 4, 4, 2), "scale": [0, 1], "domain": [1, 1]}
    inputs, targets, args, kwargs = PrepareSARBatch()(batch, "cpu")
    assert torch.equal(inputs, batch["image"]) and args == ()
    assert torch.equal(targets["image"], batch["label"]) and targets["scale"].tolist() == [0, 1]
    assert kwargs["clean"] is targets["image"], "the heads see the uncorrupted crop"


def test_loss_components_are_logged_per_epoch(tmp_path):
    loss = ScaleAwareRestorationLoss()
    values = iter([0.4, 0.2, 0.1, 0.3])

    def step(engine, batch):
        loss.components = {"restoration": next(values)}

    engine = Engine(step)
    LossComponentsLogger(loss, tmp_path / "losses.csv").attach(engine)
    engine.run([0, 1], max_epochs=2)
    lines = (tmp_path / "losses.csv").read_text().splitlines()
    assert lines[0] == "epoch,restoration"
    assert [tuple(map(float, line.split(","))) for line in lines[1:]] == [pytest.approx((1, 0.3)), pytest.approx((2, 0.2))]
