"""Checkpoint resume and loading (shared by every bundle's training)."""

import torch
import pytest
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.handlers import CheckpointSaver

from breastgen.engines import ResumeFromLatest, TrainerProgress, latest_checkpoint, load_checkpoint
from breastgen.errors import BreastGenError


def _trainer(tmp_path, epochs):
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    data = [{"image": torch.randn(2, 4), "label": torch.randn(2, 1)} for _ in range(3)]
    trainer = SupervisedTrainer(device="cpu", max_epochs=epochs, train_data_loader=data, network=net, optimizer=opt,
                                loss_function=torch.nn.MSELoss())
    objs = {"network": net, "optimizer": opt, "trainer": TrainerProgress(trainer)}
    ResumeFromLatest(tmp_path, objs).attach(trainer)
    CheckpointSaver(str(tmp_path), objs, save_interval=1, n_saved=1, file_prefix="t").attach(trainer)
    return trainer, net


def test_training_resumes_from_the_latest_checkpoint(tmp_path):
    trainer, net = _trainer(tmp_path, 2)
    trainer.run()
    assert latest_checkpoint(tmp_path).name == "t_checkpoint_epoch=2.pt"
    w2 = net.weight.detach().clone()
    # a new process with the same config and more epochs continues at epoch 3 from the saved weights
    trainer, net = _trainer(tmp_path, 3)
    seen = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: seen.append((e.state.epoch, net.weight.detach().clone())))
    trainer.run()
    assert [s[0] for s in seen] == [3] and torch.equal(seen[0][1], w2)
    assert trainer.state.iteration == 9 and latest_checkpoint(tmp_path).name == "t_checkpoint_epoch=3.pt"
    # the checkpoint holds tensors and counters only: loadable with weights_only=True
    state = torch.load(latest_checkpoint(tmp_path), weights_only=True)
    assert state["trainer"] == {"epoch": 3, "iteration": 9, "epoch_length": 3}


def test_resume_refuses_a_foreign_checkpoint_in_one_line(tmp_path):
    (tmp_path / "t_checkpoint_epoch=1.pt").write_bytes(b"not a checkpoint")
    trainer, _ = _trainer(tmp_path, 1)
    with pytest.raises(BreastGenError, match=r"cannot resume from checkpoint .*delete it") as e:
        trainer.run()
    assert "\n" not in str(e.value)


def test_load_checkpoint_errors(tmp_path):
    net = torch.nn.Linear(4, 1)
    with pytest.raises(BreastGenError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt", net)
    torch.save({"model": torch.nn.Linear(3, 1).state_dict()}, tmp_path / "other.pt")
    with pytest.raises(BreastGenError, match="does not fit the configured network"):
        load_checkpoint(tmp_path / "other.pt", net)
    torch.save(net.state_dict(), tmp_path / "bare.pt")  # a one-object CheckpointSaver writes the bare state dict
    load_checkpoint(tmp_path / "bare.pt", {"autoencoder": net})
    with pytest.raises(BreastGenError, match="has no .autoencoder. entry .it has: weight, bias"):
        load_checkpoint(tmp_path / "bare.pt", {"autoencoder": net, "unet": net})
