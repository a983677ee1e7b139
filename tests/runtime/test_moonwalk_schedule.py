"""The moonwalk schedule: backprop's tick table over MoonwalkChains, the same numbers as backprop on the
same architecture, its mode option, and the model it requires."""

from __future__ import annotations

import copy

import pytest
import torch

from gradxform.api import staged
from gradxform.errors import GradxformError
from gradxform.nn.moonwalk import MoonwalkChain
from gradxform.runtime.data import digits
from gradxform.runtime.schedules import make_schedule
from gradxform.runtime.train import TrainConfig, Trainer

from ..conftest import EXAMPLES

MLP = f"{EXAMPLES / 'mlp.py'}"
DIGITS = f"{EXAMPLES / 'resnet.py'}:digits_resnet"


def test_the_tick_table_is_backprops():
    assert make_schedule("moonwalk").ticks(2, 3).ticks == make_schedule("backprop").ticks(2, 3).ticks


def test_moonwalk_trains_as_autograd_does_on_the_same_architecture(tmp_path):
    torch.manual_seed(0)
    model = staged(DIGITS, "moonwalk").double()
    reference = copy.deepcopy(model)
    for chain in reference.modules():
        if isinstance(chain, MoonwalkChain):
            chain.mode = "autograd"   # ordinary backprop through the same pieces
    train, test = digits()
    train = torch.utils.data.TensorDataset(train.tensors[0].double(), train.tensors[1])
    test = torch.utils.data.TensorDataset(test.tensors[0].double(), test.tensors[1])
    losses = {}
    for name, m, schedule in (("moonwalk", model, "moonwalk"), ("autograd", reference, "backprop")):
        cfg = TrainConfig(schedule=schedule, epochs=1, out=str(tmp_path / name), batch_size=64, lr_schedule="constant")
        sub = torch.utils.data.TensorDataset(*[t[:64 * 3] for t in train.tensors])
        losses[name] = Trainer(m, cfg).fit(sub, test)[0]["step_losses"]
    torch.testing.assert_close(torch.tensor(losses["moonwalk"]), torch.tensor(losses["autograd"]),
                               rtol=1e-10, atol=1e-12)
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_the_mode_option_sets_every_chain(tmp_path):
    model = staged(DIGITS, "moonwalk{mode=mixed}")
    Trainer(model, TrainConfig(schedule="moonwalk{mode=forward}", out=str(tmp_path)))
    modes = {m.mode for m in model.modules() if isinstance(m, MoonwalkChain)}
    assert modes == {"forward"}


def test_a_model_without_moonwalk_chains_is_refused(tmp_path):
    with pytest.raises(GradxformError, match="the moonwalk schedule trains MoonwalkChains, and the model has none"):
        Trainer(staged(MLP, "split{stages=1}"), TrainConfig(schedule="moonwalk", out=str(tmp_path)))


def test_the_pass_makes_auto_pick_moonwalk(tmp_path):
    trainer = Trainer(staged(DIGITS, "moonwalk"), TrainConfig(out=str(tmp_path)))
    assert trainer.schedule.name == "moonwalk"
