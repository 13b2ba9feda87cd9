"""Callbacks for a stream: the W&B dashboard, the CLI's config saver for W&B, and opt-in speed options."""

from lightning_cil.callbacks.speed import ChannelsLast, CompileBackbone
from lightning_cil.callbacks.wandb_dashboard import SaveConfigToWandb, WandbDashboard, wandb_loggers

__all__ = ["ChannelsLast", "CompileBackbone", "SaveConfigToWandb", "WandbDashboard", "wandb_loggers"]
