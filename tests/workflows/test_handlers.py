import pytest
import torch

from medfm.errors import MedfmError, WeightsError
from medfm.networks import GenesisUNet3D
from medfm.workflows import PretrainedWeightsLoader


@pytest.fixture
def pretrained(tmp_path):
    torch.manual_seed(0)
    source = GenesisUNet3D()
    path = tmp_path / "model.pt"
    torch.save(source.state_dict(), path)
    return source, path


@pytest.mark.parametrize("wrap", [None, "model", "state_dict"])
def test_loads_matching_tensors_and_keeps_a_new_head_fresh(pretrained, tmp_path, wrap):
    source, path = pretrained
    if wrap:
        torch.save({wrap: source.state_dict()}, path)
    target = GenesisUNet3D(out_channels=3, output_activation=None)
    fresh_head = target.out_tr.final_conv.weight.detach().clone()
    report = PretrainedWeightsLoader(path, target)()
    assert len(report["loaded"]) == 104 and report["shape_differs"] == ["out_tr.final_conv.weight", "out_tr.final_conv.bias"]
    torch.testing.assert_close(target.down_tr512.ops[1].conv1.weight, source.down_tr512.ops[1].conv1.weight)
    torch.testing.assert_close(target.out_tr.final_conv.weight, fresh_head)


def test_a_checkpoint_that_matches_nothing_is_an_error(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(WeightsError, match="only 0 of 106 network tensors match"):
        PretrainedWeightsLoader(path, GenesisUNet3D())()


def test_too_small_a_match_is_an_error(pretrained):
    source, path = pretrained
    torch.save({k: v for k, v in source.state_dict().items() if k.startswith("down_tr64")}, path)
    with pytest.raises(WeightsError, match="only 14 of 106"):
        PretrainedWeightsLoader(path, GenesisUNet3D())()
    assert len(PretrainedWeightsLoader(path, GenesisUNet3D(), min_fraction=0.1)()["loaded"]) == 14


def _trainer(loader, max_epochs, val_interval):
    from monai.engines import SupervisedTrainer

    from medfm.workflows import CheckTrainingSchedule

    network = torch.nn.Linear(1, 1)
    return SupervisedTrainer(device=torch.device("cpu"), max_epochs=max_epochs, train_data_loader=loader, network=network,
                             optimizer=torch.optim.SGD(network.parameters(), lr=0.1), loss_function=torch.nn.MSELoss(),
                             prepare_batch=lambda batch, device, non_blocking, **kwargs: (batch, batch),
                             train_handlers=[CheckTrainingSchedule(val_interval)])


def test_a_loader_that_yields_no_batch_is_refused_before_training():
    loader = torch.utils.data.DataLoader(torch.ones(5, 1), batch_size=8, drop_last=True)
    with pytest.raises(MedfmError, match=r"no training step would run: 5 training case\(s\) with batch size 8 and drop_last "
                                         r"give no batch; lower --batch_size or add cases"):
        _trainer(loader, 3, 1)


def test_a_schedule_that_never_validates_is_refused_and_one_that_does_runs():
    loader = torch.utils.data.DataLoader(torch.ones(4, 1), batch_size=2)
    with pytest.raises(MedfmError, match=r"no validation would run in epochs 1 to 1 \(--val_interval 5\), so no checkpoint "
                                         r"would be saved; set --val_interval to at most 1 or raise --max_epochs"):
        _trainer(loader, 1, 5).run()
    trainer = _trainer(loader, 5, 5)
    trainer.run()
    assert trainer.state.epoch == 5


def _evaluated_engine(per_class_dice):
    from ignite.engine import Engine

    engine = Engine(lambda engine, batch: None)
    engine.state.metrics = {"val_mean_dice": float(per_class_dice.mean())}
    engine.state.metric_details = {"val_mean_dice": per_class_dice}
    return engine


def test_metric_reports_name_the_dataset_labels(tmp_path):
    from medfm.workflows import LabelledMetricsSaver

    labels = {"0": "background", "1": "liver", "2": "tumour"}
    saver = LabelledMetricsSaver(str(tmp_path), labels, metric_details=["val_mean_dice"], summary_ops=["mean"])
    saver._filenames = ["a.nii.gz", "b.nii.gz"]
    saver(_evaluated_engine(torch.tensor([[0.5, 0.25], [0.75, 0.25]])))
    raw = (tmp_path / "val_mean_dice_raw.csv").read_text().splitlines()
    assert raw[0] == "filename,liver,tumour,mean" and raw[1].startswith("a.nii.gz,0.5")
    assert [row.split(",")[0] for row in (tmp_path / "val_mean_dice_summary.csv").read_text().splitlines()] == \
        ["class", "liver", "tumour", "mean"]

    with pytest.raises(MedfmError, match=r"val_mean_dice_raw.csv: the metric has class class2 but the labels name only 2 "
                                         r"\(liver, tumour\); check include_background"):
        saver(_evaluated_engine(torch.rand(2, 3)))  # a metric that kept the background channel
