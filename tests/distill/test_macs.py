"""The MAC count matches the arithmetic of known layers and ranks the Jetson student."""

from __future__ import annotations

import pytest
import torch

from distill.macs import count_macs


def test_conv_depthwise_and_linear_counts_by_hand():
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),  # 32*32 outputs x 8 ch x 3 in x 9 taps
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise: 1 input channel each
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4))
    net.train()
    assert count_macs(net) == 32 * 32 * 8 * 3 * 9 + 32 * 32 * 8 * 1 * 9 + 8 * 4
    assert net.training  # the mode is restored


@pytest.mark.parametrize("name", ["signnet_mobile", "signnet_mobile_wide"])
def test_the_registered_students_need_under_a_quarter_of_the_teachers_macs(name):
    from cloud_train.models import create_model

    teacher = count_macs(create_model("signnet", 14, input_size=32))
    student = count_macs(create_model(name, 14, input_size=32))
    assert 0 < student <= teacher / 4
