"""SimpleCIL (Zhou et al., "Revisiting Class-Incremental Learning with Pre-Trained Models", IJCV 2024)."""

from __future__ import annotations

from lightning_cil.methods.prototypes import VIT_IN21K, PrototypeModule
from lightning_cil.networks.backbones import BackboneSpec

__all__ = ["SimpleCIL"]


class SimpleCIL(PrototypeModule):
    """A frozen pre-trained model and cosine prototypes: nothing trains.

    At each task end the prototype of every new class is the mean feature ([CLS] after the final LayerNorm) of its
    training images under the test transform; a test image goes to the class of highest cosine similarity among
    all seen classes. Old prototypes never change, so the last accuracy does not depend on how the classes are split
    into tasks or in which order they come, and nothing is forgotten beyond the competition of new classes.
    Every task has 0 epochs (PILOT's ``tuned_epoch 0``).

    Deviation: the input is the backbone's own data config (timm's mean/std, for these weights 0.5/0.5), where
    PILOT feeds unnormalised [0, 1] images; the reference numbers are in ``configs/simplecil_*_vit.yaml``.

    Args:
        backbone: the pre-trained network (the paper: ViT-B/16 IN21K, ``timm:vit_base_patch16_224.augreg_in21k``).
        in_channels: image channels.
        pretrained: ``hub`` or a local weights file.
    """

    def __init__(
        self, backbone: BackboneSpec = f"timm:{VIT_IN21K}", in_channels: int = 3, pretrained: str | None = "hub"
    ) -> None:
        super().__init__(backbone, in_channels, pretrained=pretrained)
