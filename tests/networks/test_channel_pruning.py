"""DER's channel masks and pruning: a pruned extractor computes what its masked original computed."""

import pytest
import torch
from torch import nn

from lightning_cil.networks import build_backbone
from lightning_cil.networks.channel_pruning import ChannelGates, prune_channels


def _randomised(name: str) -> nn.Module:
    """A backbone with non-trivial BatchNorm statistics and affine parameters, in eval mode."""
    net = build_backbone(name, 3)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    return net.eval()


@pytest.mark.parametrize(("name", "size"), [("resnet20", 32), ("resnet18_cifar", 32), ("resnet18", 64)])
def test_pruned_extractor_equals_its_binary_masked_original(name, size):
    torch.manual_seed(0)
    net = _randomised(name)
    gates = ChannelGates(net).eval()
    with torch.no_grad():
        for e in gates.embeddings:
            e.copy_(torch.randn_like(e))  # about half of every gate off
    gates.attach(net)
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        masked = net(x)
    kept = gates.kept()
    gates.detach()
    before = sum(p.numel() for p in net.parameters())
    prune_channels(net, kept)
    with torch.no_grad():
        pruned = net(x)

    features = kept[gates.layout.stages - 1]
    assert net.out_dim == len(features) == pruned.shape[1] < masked.shape[1]
    torch.testing.assert_close(pruned, masked[:, features], rtol=1e-5, atol=1e-5)
    off = torch.ones(masked.shape[1], dtype=torch.bool)
    off[features] = False
    assert torch.all(masked[:, off] == 0)  # a channel that is off is exactly zero in the masked network
    after = sum(p.numel() for p in net.parameters())
    assert after < 0.5 * before, (before, after)


def test_sparsity_is_the_size_weighted_fraction_of_weights_in_use():
    net = build_backbone("resnet20", 3)
    gates = ChannelGates(net).eval()  # eval: binary masks, all on at the initial embedding
    assert gates.sparsity().item() == pytest.approx(1.0)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    total = sum(m.weight.numel() for m in convs)
    with torch.no_grad():
        gates.embeddings[0][:8] = -1.0  # half of the stem / first stage's stream channels
    kept = gates.kept()
    clone = build_backbone("resnet20", 3)
    prune_channels(clone, kept)
    remaining = sum(m.weight.numel() for m in clone.modules() if isinstance(m, nn.Conv2d))
    assert gates.sparsity().item() == pytest.approx(remaining / total)


def test_masks_anneal_and_pass_gradients_to_the_embeddings():
    net = build_backbone("resnet20", 3)
    gates = ChannelGates(net).train()
    gates.attach(net)
    gates.scale = 1 / gates.s_max
    assert torch.allclose(gates.mask(0), torch.full((16,), 0.5), atol=0.01)
    gates.scale = gates.s_max
    assert torch.all(gates.mask(0) > 0.999)
    gates.scale = 1.0
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(e.grad is not None and e.grad.abs().sum() > 0 for e in gates.embeddings)


def test_a_mask_that_does_not_fit_is_refused():
    net = build_backbone("resnet20", 3)
    kept = ChannelGates(net).kept()
    with pytest.raises(ValueError, match="has 3 gates but this extractor has"):
        prune_channels(net, kept[:3])
    kept[0] = torch.tensor([0, 99])
    with pytest.raises(ValueError, match=r"gate 0 keeps channels \[0, 99\], which do not fit its 16 channels"):
        prune_channels(net, kept)


def test_non_resnet_backbones_are_refused():
    with pytest.raises(ValueError, match="channel pruning supports the ResNet backbones"):
        ChannelGates(nn.Sequential(nn.Conv2d(3, 8, 3)))
