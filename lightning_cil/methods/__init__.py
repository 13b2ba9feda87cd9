"""CIL methods: one LightningModule subclass per file, all on the IncrementalModule contract."""

from lightning_cil.methods.aper import APER
from lightning_cil.methods.base import IncrementalModule, TaskSchedule
from lightning_cil.methods.bic import BiC
from lightning_cil.methods.coda_prompt import CODAPrompt
from lightning_cil.methods.der import DER
from lightning_cil.methods.dualprompt import DualPrompt
from lightning_cil.methods.ease import EASE
from lightning_cil.methods.ewc import EWC
from lightning_cil.methods.finetune import Finetune
from lightning_cil.methods.icarl import ICaRL
from lightning_cil.methods.joint import Joint
from lightning_cil.methods.l2p import L2P
from lightning_cil.methods.lwf import LwF
from lightning_cil.methods.packnet import PackNet
from lightning_cil.methods.piggyback import Piggyback
from lightning_cil.methods.ranpac import RanPAC
from lightning_cil.methods.simplecil import SimpleCIL
from lightning_cil.methods.slca import SLCA
from lightning_cil.methods.wa import WA

__all__ = [
    "APER",
    "BiC",
    "CODAPrompt",
    "DER",
    "DualPrompt",
    "EASE",
    "EWC",
    "Finetune",
    "ICaRL",
    "IncrementalModule",
    "Joint",
    "L2P",
    "LwF",
    "PackNet",
    "Piggyback",
    "RanPAC",
    "SimpleCIL",
    "SLCA",
    "TaskSchedule",
    "WA",
]
