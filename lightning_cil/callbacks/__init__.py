"""Callbacks that watch a stream: the W&B dashboard and the CLI's config saver for W&B."""

from lightning_cil.callbacks.wandb_dashboard import SaveConfigToWandb, WandbDashboard, wandb_loggers

__all__ = ["SaveConfigToWandb", "WandbDashboard", "wandb_loggers"]
