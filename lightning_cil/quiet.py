"""Lightning and PyTorch notices that tell a ``lightning-cil`` user nothing: each silenced by its exact text.

Installed by the command's entry point only; code that uses the library from Python keeps every notice.
"""

from __future__ import annotations

import logging
import re
import warnings

__all__ = ["NOTICES", "WARNINGS", "silence_meaningless_notices"]

#: log records of Lightning's rank-zero logger that are dropped (regular expressions, matched at the start)
NOTICES = (
    # advertisements for cloud services, printed at every Trainer construction and every fit
    r"💡 Tip: For seamless cloud (logging|uploads).*\[(litlogger|litmodels)\]",
    # the stream raises max_epochs by each task's epochs: the cumulative count is no setting of the user's
    r"`Trainer\.fit` stopped: `max_epochs=\d+` reached\.",
)

#: warnings that are ignored: (message regular expression, category)
WARNINGS = (
    # Lightning's own use of a torch API that torch deprecated; nothing a user can change
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    # torchdata's StatefulDataLoader (the training loader) calls a torch API that torch deprecated, at every epoch
    (r"'set_vital' is deprecated, please do not call", UserWarning),
    # the stream's validation loader is deliberately empty during a fit (unless data.val_during_fit): every task
    # is evaluated with `trainer.test` after its fit instead
    # a training-free task (epochs: 0) runs a fit of no epochs, which has nothing to optimise
    (r"`LightningModule.configure_optimizers` returned `None`, this fit will run with no optimizer", UserWarning),
    (r"Total length of `list` across ranks is zero\. Please make sure this was your intention\.", UserWarning),
)

RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"


class _DropNotices(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.patterns = [re.compile(pattern) for pattern in NOTICES]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(pattern.match(message) for pattern in self.patterns)


def silence_meaningless_notices() -> None:
    """Drop exactly the notices in :data:`NOTICES` and :data:`WARNINGS` (idempotent)."""
    logger = logging.getLogger(RANK_ZERO_LOGGER)
    if not any(isinstance(f, _DropNotices) for f in logger.filters):
        logger.addFilter(_DropNotices())
    for message, category in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
