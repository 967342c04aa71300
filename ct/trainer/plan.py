"""A tuning round's plan: train.py's tuning flags checked and frozen into what the round and its
helpers agree on (the base config, trials, budget, optimizers, the recipe trial), and how a trial's
Optuna params become config keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ct.trainer import study as studies
from ct.trainer.config import with_added_keys
from ct.trainer.data import Cifar
from ct.trainer.engine import OPTIMIZERS
from ct.trainer.errors import UsageError

VAL_FRACTION = 10  # one tenth of the training images validate, at most MAX_VAL
MAX_VAL = 5000


@dataclass(frozen=True)
class TuneOptions:
    """train.py's tuning flags."""

    trials: int  # slots this round adds to the study
    time_budget: float  # seconds for the round
    optimizers: str  # comma list the search may pick from (the base config's is added)
    max_epochs: int  # the longest trial the search may propose
    sampler: str  # tpe or random
    pruner: str  # ct.trainer.study.PRUNERS
    worker: int  # 0: the round's owner; K > 0: a helper joining the open round
    stale_after: float  # seconds without a heartbeat before a trial counts as lost
    recipe: dict[str, Any] | None = None  # the default preset's config, tried second; None: not


def make_plan(base: dict[str, Any], tuning: TuneOptions) -> dict[str, Any]:
    wanted = [o.strip() for o in tuning.optimizers.split(",") if o.strip()]
    unknown = [o for o in wanted if o not in OPTIMIZERS]
    if not wanted or unknown:
        raise UsageError(f"--optimizers takes a comma list of {', '.join(OPTIMIZERS)}, "
                         f"not {tuning.optimizers!r}")
    studies.make_pruner(tuning.pruner)  # a bad name fails here, before any work
    studies.make_sampler(tuning.sampler, 0)
    chosen = [o for o in OPTIMIZERS if o in wanted or o == base["optimizer"]]
    if tuning.max_epochs < 1:
        raise UsageError(f"--max-epochs must be at least 1, not {tuning.max_epochs}")
    return {"base": base, "trials": tuning.trials, "time_budget": tuning.time_budget,
            "optimizers": chosen, "max_epochs": tuning.max_epochs, "sampler": tuning.sampler,
            "pruner": tuning.pruner, "recipe": recipe_params(base, tuning, chosen)}


def recipe_params(base: dict[str, Any], tuning: TuneOptions, optimizers: list[str]
                  ) -> dict[str, Any] | None:
    """The default recipe's searched values (its epochs capped by --max-epochs), unless it is
    not wanted, its optimizer is excluded, or the pushed config already is the recipe."""
    if tuning.recipe is None or tuning.recipe["optimizer"] not in optimizers:
        return None
    recipe = {**tuning.recipe, "epochs": min(tuning.recipe["epochs"], tuning.max_epochs)}
    params = studies.params_of(recipe, base)
    return None if params == studies.params_of(base, base) else params


def upgrade_plan(plan: dict[str, Any]) -> dict[str, Any]:
    """A stored plan with the keys its base config lacks (ct.trainer.config.with_added_keys): a
    round begun before they existed is still continued."""
    if not isinstance(plan.get("base"), dict):  # not a plan: left as it is, it matches none
        return plan
    return {**plan, "base": with_added_keys(plan["base"])}


def validation_images(base: dict[str, Any], data: Cifar) -> int:
    n_train = base["subset"] or len(data.train_x)
    return min(MAX_VAL, max(1, n_train // VAL_FRACTION))


def config_of(params: dict[str, Any]) -> dict[str, Any]:
    """A trial's config keys from its Optuna params (lr_<optimizer> -> lr, ...)."""
    optimizer = params["optimizer"]
    return {"optimizer": optimizer, "lr": params[f"lr_{optimizer}"],
            "weight_decay": params[f"weight_decay_{optimizer}"], "epochs": params["epochs"],
            **{key: params[key] for key in studies.SHARED if key in params}}
