"""Robust distillation: the KD, ARD and RSLAD losses as their papers write them, the
adversaries they train against, the Jetson-shaped student, and `distill train` end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from toy_data import toy_shapes, trained_toy_model

from cloud_train import gtsrb
from cloud_train.checkpoint import load_checkpoint, save_checkpoint
from cloud_train.models import count_parameters, create_model
from cloud_train.tensors import make_loader
from cloud_train.train import TrainConfig, train
from distill.robust_distill import ard_step, kd_step, rslad_adversary, rslad_step, soft_kl
from roadshield.cli import main as cli_main
from roadshield_base.errors import ConfigError
from roadshield_base.fileio import file_sha256

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NAMES = ["red_disc", "blue_square", "green_triangle", "yellow_cross"]


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    model, _, _ = trained_toy_model(n_test=8)
    return model.eval()


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = toy_shapes(16, seed=3)
    return (torch.as_tensor(x).permute(0, 3, 1, 2).float() / 255, torch.as_tensor(y))


def student() -> torch.nn.Module:
    torch.manual_seed(1)
    return create_model("signnet_mobile", len(NAMES))


def test_soft_kl_is_the_teachers_kl_to_the_student_batch_mean():
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    p, q = F.softmax(t / 3, 1), F.softmax(s / 3, 1)
    manual = (p * (p.log() - q.log())).sum(1).mean()
    assert torch.allclose(soft_kl(s, t, 3.0), manual, atol=1e-6)
    assert soft_kl(t, t).abs() < 1e-6


def test_kd_and_ard_weigh_the_teacher_and_the_labels_as_written(teacher, batch):
    x, y = batch
    net = student().eval()  # eval: dropout off, so the terms can be recomputed exactly
    cfg = TrainConfig(trainer="kd", kd_temperature=4.0, kd_alpha=0.75)
    loss, logits = kd_step(net, x, y, cfg, 0.0, teacher=teacher)
    with torch.no_grad():
        expected = 0.75 * 16 * soft_kl(logits, teacher(x), 4.0) + \
            0.25 * F.cross_entropy(logits, y)
    assert torch.allclose(loss.detach(), expected, atol=1e-5)
    cfg = TrainConfig(trainer="ard", kd_temperature=30.0, kd_alpha=1.0, pgd_steps=2)
    loss, adv_logits = ard_step(net, x, y, cfg, 8 / 255, teacher=teacher)
    assert torch.isfinite(loss) and adv_logits.shape == (16, 4)
    assert not torch.allclose(adv_logits, net(x))  # the attacked batch, not the clean one


def test_the_rslad_adversary_stays_in_the_ball_and_raises_the_kl(teacher, batch):
    x, _ = batch
    net = student().eval()
    with torch.no_grad():
        t_logits = teacher(x)
        before = soft_kl(net(x), t_logits)
    x_adv = rslad_adversary(net, x, t_logits, eps=8 / 255, alpha=2 / 255, steps=5)
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert soft_kl(net(x_adv), t_logits) > before


def test_rslad_is_five_sixths_attacked_and_one_sixth_clean(teacher, batch, monkeypatch):
    x, y = batch
    net = student().eval()
    fixed = (x + 4 / 255).clamp(0, 1)
    monkeypatch.setattr("distill.robust_distill.rslad_adversary", lambda *a, **k: fixed)
    loss, _ = rslad_step(net, x, y, TrainConfig(trainer="rslad"), 8 / 255, teacher=teacher)
    with torch.no_grad():
        t = teacher(x)
        expected = 5 / 6 * soft_kl(net(fixed), t) + 1 / 6 * soft_kl(net(x), t)
    assert torch.allclose(loss.detach(), expected, atol=1e-6)


def test_train_refuses_a_distillation_trainer_without_a_teacher_and_the_reverse(teacher):
    x, y = toy_shapes(32, seed=4)
    loader = make_loader(x, y, batch_size=16, shuffle=False)
    with pytest.raises(ConfigError, match="needs a teacher"):
        train(student(), loader, TrainConfig(trainer="rslad", epochs=1), progress=False)
    with pytest.raises(ConfigError, match="takes no teacher"):
        train(student(), loader, TrainConfig(trainer="standard", epochs=1), progress=False,
              teacher=teacher)


def test_the_mobile_student_is_small_and_exposes_its_features():
    net = create_model("signnet_mobile", 14).eval()
    assert count_parameters(net) < count_parameters(create_model("signnet", 14)) / 5
    x = torch.rand(3, 3, 32, 32)
    assert torch.allclose(net.classify(net.embed(x)), net(x), atol=1e-6)
    assert net(torch.rand(2, 3, 48, 48)).shape == (2, 14)


def test_distill_train_writes_a_student_that_records_its_teacher(teacher, tmp_path, capsys):
    data = tmp_path / "gtsrb"
    for split, seed, n in (("train", 10, 160), ("test", 11, 40)):
        xs, ys = toy_shapes(n, seed=seed)
        gtsrb.write_split(xs, ys, NAMES, data, split)
    teacher_path = tmp_path / "teacher.safetensors"
    save_checkpoint(teacher, teacher_path, {"class_names": NAMES})
    out = tmp_path / "student.safetensors"
    assert cli_main(["distill", "train", "--teacher", str(teacher_path), "--data", str(data),
                     "--out", str(out), "--method", "rslad", "--epochs", "1",
                     "--batch-size", "32", "--pgd-steps", "2", "--device", "cpu"]) == 0
    assert "checkpoint" in capsys.readouterr().out
    model, meta = load_checkpoint(out)
    assert meta["arch"] == "signnet_mobile" and meta["class_names"] == NAMES
    assert meta["teacher"]["sha256"] == file_sha256(teacher_path)
    assert meta["train_config"]["trainer"] == "rslad"
    assert meta["train_config"]["kd_temperature"] == 1.0


def test_distill_train_refuses_bad_settings_before_training(teacher, tmp_path):
    other = tmp_path / "other.safetensors"
    save_checkpoint(teacher, other, {"class_names": ["a", "b", "c", "d"]})
    data = tmp_path / "gtsrb"
    xs, ys = toy_shapes(40, seed=1)
    gtsrb.write_split(xs, ys, NAMES, data, "train")
    args = ["distill", "train", "--data", str(data), "--out", str(tmp_path / "s.safetensors"),
            "--epochs", "1", "--device", "cpu"]
    assert cli_main([*args, "--teacher", str(other)]) == 2  # another class list
    assert cli_main([*args, "--teacher", str(other), "--method", "rslad",
                     "--temperature", "4"]) == 2
    assert cli_main([*args, "--teacher", str(other), "--method", "kd", "--alpha", "1.5"]) == 2
    assert not (tmp_path / "s.safetensors").exists()


def test_the_distillation_settings_are_checked():
    with pytest.raises(ConfigError, match="kd_temperature"):
        TrainConfig(trainer="rslad", kd_temperature=0.0)
    with pytest.raises(ConfigError, match="kd_alpha"):
        TrainConfig(trainer="kd", kd_alpha=-0.1)
