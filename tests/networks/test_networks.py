import pytest
import torch

from lightning_cil.networks import IncrementalLinear, build_backbone, list_backbones


@pytest.mark.parametrize("name", list_backbones())
@pytest.mark.parametrize("channels", [1, 3])
def test_backbones_give_flat_features(name, channels):
    net = build_backbone(name, in_channels=channels).eval()
    size = 64 if name == "resnet18" else 32
    with torch.no_grad():
        out = net(torch.randn(2, channels, size, size))
    assert out.shape == (2, net.out_dim)


def test_resnet32_is_the_cifar_resnet():
    net = build_backbone("resnet32")
    assert net.out_dim == 64
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(464_154, rel=0.01)  # 0.46M (He et al.)


def test_unknown_backbone_lists_choices():
    with pytest.raises(ValueError, match=r"backbone='vit' is unknown; choose one of \[.*'resnet32'"):
        build_backbone("vit")


def test_head_growth_keeps_old_rows():
    head = IncrementalLinear(4)
    assert head(torch.randn(3, 4)).shape == (3, 0)
    head.expand(2)
    old_w, old_b = head.weight.detach().clone(), head.bias.detach().clone()
    head.expand(5)
    assert head.out_features == 5
    assert torch.equal(head.weight[:2], old_w) and torch.equal(head.bias[:2], old_b)
    assert head.weight[2:].abs().sum() > 0
    head.expand(3)  # shrinking is a no-op
    assert head.out_features == 5
