"""DER's channel masks on a ResNet extractor, and the pruning that removes the channels they switch off.

A ResNet's channels come in groups that must be kept or removed together ("gates"):

- one gate per stage for the residual stream: the stem (for the first stage), every block's output and
  every downsampling shortcut of that stage write to the same channels, so they share one mask;
- one gate per residual block for its inner channels (``conv1``'s outputs, ``conv2``'s inputs).

The mask of a gate is ``m = sigmoid(s * e)`` with a learned ``e`` per channel. It multiplies the stem's
BatchNorm output, each block's ``bn1`` output and each block's output. Because every mask value is positive,
``relu(a) * m == relu(a * m)`` and pooling commutes with it, so with binary masks a channel that is off is
exactly zero everywhere: removing it (and the weights that read it) leaves the outputs unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_cil.networks.backbones import CifarResNet, _CifarBlock, _TorchvisionFeatures, replace_submodule

__all__ = ["ChannelGates", "prune_channels", "resnet_layout"]

#: HAT's bound on the mask embeddings: beyond it sigmoid(s * e) is saturated for every s used in training
EMBEDDING_BOUND = 6.0


@dataclass
class _Conv:
    """One convolution, its BatchNorm, and the gates of its input and output channels (module paths)."""

    conv: str
    bn: str
    in_gate: int | None  # None: the image channels, never pruned
    out_gate: int


@dataclass
class ResNetLayout:
    """Where the gates of a ResNet extractor sit (module paths relative to the extractor)."""

    stages: int
    gate_widths: list[int]
    convs: list[_Conv]
    stem_bn: str
    blocks: list[tuple[str, int, int]] = field(default_factory=list)  # (block path, stage gate, inner gate)


def resnet_layout(extractor: nn.Module) -> ResNetLayout:
    """The gates of a basic-block ResNet (``resnet20/32`` for CIFAR, ``resnet18``, ``resnet18_cifar``)."""
    if isinstance(extractor, CifarResNet):
        prefix, stage_names = "", ["layer1", "layer2", "layer3"]
    elif isinstance(extractor, _TorchvisionFeatures) and hasattr(extractor.net, "layer4"):
        prefix, stage_names = "net.", ["layer1", "layer2", "layer3", "layer4"]
    else:
        raise ValueError(
            f"channel pruning supports the ResNet backbones (resnet20, resnet32, resnet18, resnet18_cifar), "
            f"not {type(extractor).__name__}; set prune: false for other backbones."
        )
    stem_conv = extractor.get_submodule(prefix + "conv1")
    widths = [extractor.get_submodule(prefix + name)[-1].bn2.num_features for name in stage_names]
    layout = ResNetLayout(len(stage_names), list(widths), [], prefix + "bn1")
    layout.convs.append(_Conv(prefix + "conv1", prefix + "bn1", None, 0))
    for stage, name in enumerate(stage_names):
        for b, block in enumerate(extractor.get_submodule(prefix + name)):
            path = f"{prefix}{name}.{b}"
            if not hasattr(block, "conv2") or hasattr(block, "conv3"):
                raise ValueError(f"channel pruning supports basic residual blocks; {path} is {type(block).__name__}.")
            in_gate = stage - 1 if b == 0 and stage > 0 else stage
            inner = len(layout.gate_widths)
            layout.gate_widths.append(block.bn1.num_features)
            layout.blocks.append((path, stage, inner))
            layout.convs.append(_Conv(f"{path}.conv1", f"{path}.bn1", in_gate, inner))
            layout.convs.append(_Conv(f"{path}.conv2", f"{path}.bn2", inner, stage))
            if getattr(block, "downsample", None) is not None:
                layout.convs.append(_Conv(f"{path}.downsample.0", f"{path}.downsample.1", in_gate, stage))
    assert stem_conv.out_channels == layout.gate_widths[0]
    return layout


class _CompensatedSigmoid(torch.autograd.Function):
    """sigmoid(s * e) whose gradient is that of s_max * sigmoid(e) (HAT's embedding-gradient compensation).

    Without it the gradient reaching ``e`` is scaled by s, which the schedule keeps near 0 early in the epoch
    and saturates later, so the masks would hardly learn.
    """

    @staticmethod
    def forward(ctx, e: Tensor, s: float, s_max: float) -> Tensor:
        ctx.save_for_backward(e)
        ctx.s_max = s_max
        return torch.sigmoid(s * e)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (e,) = ctx.saved_tensors
        sig = torch.sigmoid(e)
        return grad * ctx.s_max * sig * (1 - sig), None, None


class ChannelGates(nn.Module):
    """Learned channel masks for one ResNet extractor, attached with forward hooks.

    ``scale`` (s) is set by the method every batch; in eval mode the masks are binary (``e > 0``; the limit
    of the annealing). ``sparsity()`` is DER's
    size-weighted fraction of weights in use. ``kept()`` are the channels whose binarised mask is on.

    Args:
        extractor: the ResNet extractor to mask.
        s_max: the largest mask scale (the end of each epoch's annealing, and evaluation).
        init: initial embedding value of every channel (positive: all channels start on).
    """

    def __init__(self, extractor: nn.Module, s_max: float = 400.0, init: float = EMBEDDING_BOUND) -> None:
        super().__init__()
        self.layout = resnet_layout(extractor)
        self.embeddings = nn.ParameterList(
            [nn.Parameter(torch.full((w,), float(init))) for w in self.layout.gate_widths]
        )
        self.s_max = float(s_max)
        self.scale = self.s_max
        in_channels = extractor.get_submodule(self.layout.convs[0].conv).in_channels
        self._conv_terms = []
        for spec in self.layout.convs:
            conv = extractor.get_submodule(spec.conv)
            k = conv.kernel_size[0] * conv.kernel_size[1]
            self._conv_terms.append((k, spec.in_gate, in_channels, spec.out_gate))
        self._total = sum(
            k * (self.layout.gate_widths[i] if i is not None else c) * self.layout.gate_widths[o]
            for k, i, c, o in self._conv_terms
        )
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def mask(self, gate: int) -> Tensor:
        """Soft mask while training; in eval mode the binarised mask, which is exactly what pruning keeps."""
        e = self.embeddings[gate]
        if self.training:
            return _CompensatedSigmoid.apply(e, self.scale, self.s_max)
        return torch.zeros_like(e).index_fill_(0, self._kept(e).to(e.device), 1.0)

    def _hook(self, gate: int) -> Callable[[nn.Module, tuple, Tensor], Tensor]:
        def apply(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
            return output * self.mask(gate).to(output.dtype)[None, :, None, None]

        return apply

    def attach(self, extractor: nn.Module) -> None:
        """Start masking ``extractor`` (the one this was built for)."""
        self.detach()
        targets = [(self.layout.stem_bn, 0)]
        for path, stage, inner in self.layout.blocks:
            targets += [(f"{path}.bn1", inner), (path, stage)]
        for path, gate in targets:
            self._handles.append(extractor.get_submodule(path).register_forward_hook(self._hook(gate)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def sparsity(self) -> Tensor:
        """sum_l K_l |m_{l-1}| |m_l| / sum_l K_l c_{l-1} c_l: the fraction of convolution weights still in use."""
        norms = [self.mask(g).sum() for g in range(len(self.embeddings))]
        used = sum(k * (norms[i] if i is not None else c) * norms[o] for k, i, c, o in self._conv_terms)
        return used / self._total

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep embeddings within HAT's bound, where the annealed sigmoid is saturated anyway."""
        for e in self.embeddings:
            e.clamp_(-EMBEDDING_BOUND, EMBEDDING_BOUND)

    @staticmethod
    @torch.no_grad()
    def _kept(e: Tensor) -> Tensor:
        on = torch.nonzero(e > 0).flatten()
        return on if len(on) else e.argmax().view(1)  # an empty layer would cut the network

    def kept(self) -> list[Tensor]:
        """Per gate, the sorted indices of the channels whose binarised mask is on (at least one per gate)."""
        return [self._kept(e).cpu() for e in self.embeddings]

    def fraction_kept(self) -> float:
        kept = self.kept()
        return sum(len(k) for k in kept) / sum(self.layout.gate_widths)


def _sliced_conv(conv: nn.Conv2d, out_idx: Tensor, in_idx: Tensor | None) -> nn.Conv2d:
    weight = conv.weight.detach()[out_idx]
    if in_idx is not None:
        weight = weight[:, in_idx]
    new = nn.Conv2d(
        weight.shape[1], weight.shape[0], conv.kernel_size, conv.stride, conv.padding, conv.dilation,
        bias=conv.bias is not None, device=weight.device, dtype=weight.dtype,
    )  # fmt: skip
    with torch.no_grad():
        new.weight.copy_(weight)
        if conv.bias is not None:
            new.bias.copy_(conv.bias.detach()[out_idx])
    return new.requires_grad_(conv.weight.requires_grad).train(conv.training)


def _sliced_bn(bn: nn.BatchNorm2d, idx: Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(len(idx), bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device=bn.weight.device)
    with torch.no_grad():
        for name in ("weight", "bias"):
            getattr(new, name).copy_(getattr(bn, name).detach()[idx])
        new.running_mean.copy_(bn.running_mean[idx])
        new.running_var.copy_(bn.running_var[idx])
        new.num_batches_tracked.copy_(bn.num_batches_tracked)
    return new.requires_grad_(bn.weight.requires_grad).train(bn.training)


@torch.no_grad()
def prune_channels(extractor: nn.Module, kept: list[Tensor]) -> None:
    """Remove, in place, every channel not in ``kept`` (per gate, as from :meth:`ChannelGates.kept`).

    The result computes what the binary-masked original computed, restricted to the kept channels of the
    last stage; its ``out_dim`` shrinks to their number. Also used to rebuild a pruned extractor's shapes
    from a checkpoint before its weights are loaded.
    """
    layout = resnet_layout(extractor)
    if len(kept) != len(layout.gate_widths):
        raise ValueError(
            f"the channel mask has {len(kept)} gates but this extractor has {len(layout.gate_widths)}: the mask "
            f"was made for another architecture."
        )
    for gate, (idx, width) in enumerate(zip(kept, layout.gate_widths)):
        if len(idx) == 0 or int(idx.max()) >= width:
            raise ValueError(f"gate {gate} keeps channels {idx.tolist()}, which do not fit its {width} channels.")
    kept = [torch.as_tensor(k, dtype=torch.long) for k in kept]
    for path, stage, _ in layout.blocks:  # option-A shortcuts: map each kept output channel to its source
        block = extractor.get_submodule(path)
        if isinstance(block, _CifarBlock) and (block.stride != 1 or block.pad):
            in_gate = stage - 1
            before = block.pad // 2
            position = {int(c): p for p, c in enumerate(kept[in_gate])}
            source = [position.get(int(c) - before, len(kept[in_gate])) for c in kept[stage]]
            block.set_shortcut_index(torch.tensor(source, dtype=torch.long))
    for spec in layout.convs:
        out_idx = kept[spec.out_gate]
        in_idx = None if spec.in_gate is None else kept[spec.in_gate]
        replace_submodule(extractor, spec.conv, _sliced_conv(extractor.get_submodule(spec.conv), out_idx, in_idx))
        replace_submodule(extractor, spec.bn, _sliced_bn(extractor.get_submodule(spec.bn), out_idx))
    extractor.out_dim = len(kept[layout.stages - 1])
