"""Known, harmless third-party messages, filtered where they are raised: each by its warning
category and module or its logger, and a regex of its text. Anything else still shows."""

from __future__ import annotations

import logging
import re
import warnings

# (message regex, category, module regex of the code the warning is attributed to)
WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # Opacus' hooks on modules whose output is a view; its per-sample gradients are unaffected
    (
        "Full backward hook is firing when gradients are computed with respect to module outputs",
        UserWarning,
        "",
    ),
    ("Optimal order is the largest alpha", UserWarning, r"opacus\."),
    # torch 2.14 deprecates LeafSpec; Lightning 2.6's own pytree copy still builds one
    (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        FutureWarning,
        r"lightning\.pytorch\.utilities\._pytree",
    ),
    ("The number of training batches .* is smaller than the logging interval", UserWarning, ""),
    # Step checkpoints hold the state after the step, as resume needs (docs/reliability.md);
    # the Poisson sampler resumes mid-epoch through DataModule.state_dict.
    ("Using ModelCheckpoint with manual optimization and every_n_train_steps", UserWarning, ""),
    ("You're resuming from a checkpoint that ended before the epoch ended", UserWarning, ""),
    # conf/hydra/launcher/ray.yaml sets the Ray plugin's own `ray` launcher config (same name):
    # Hydra 1.3 merges the file onto the plugin's schema, as intended, and warns.
    (
        r"\s*'hydra/launcher/ray' is validated against ConfigStore schema with the same name",
        Warning,
        "",
    ),
)

# Lightning's INFO lines through its rank-zero logger (the pytorch or the fabric one, whichever
# was imported last): adverts, and the normal end of fit (the summary line has the steps).
LIGHTNING_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
)
LIGHTNING_INFO = (
    r"💡 Tip: ",
    r"`Trainer.fit` stopped: `max_(epochs|steps)=\d+` reached\.",
)


class _Drop(logging.Filter):
    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or not self.pattern.match(record.getMessage())


_FILTER = _Drop(LIGHTNING_INFO)


def install() -> None:
    """Add the filters (idempotent: warnings and logging skip duplicates)."""
    for message, category, module in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name in LIGHTNING_LOGGERS:
        logging.getLogger(name).addFilter(_FILTER)
