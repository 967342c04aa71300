"""The tuning study: Optuna's search space, sampler, pruner and storage, and the round's trial
slots that several workers share. Runs in the tuning container only (the training image has no
optuna); `ct.trainer.tune` drives a round with it.

One study per problem: its name hashes what the objective depends on (the search space, the
dataset, the training images, the fixed part of the config), so a later round (another push below
the threshold, the weekly retrain) continues it and TPE learns from every earlier trial, while a
changed space or dataset starts a new study. A round is one `train.py --tune`: its trials are
"slots" enqueued in the study, tagged with the round's run id; workers pop them atomically (the
storage's WAITING -> RUNNING transition), so N slots run exactly N trials however many workers
share them. A trial whose worker died (heartbeat older than --stale-after, or this worker's own
trial found RUNNING at start) is failed once (the storage lets exactly one caller do that) and
re-enqueued with the same params, resuming from the dead trial's checkpoint: never lost, never
counted twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import FrozenTrial, TrialState

from ct import workspace as names
from ct.trainer.config import without_legacy_values
from ct.trainer.errors import UsageError
from network import ignored_keys

STORAGE_ENV = "CT_TUNE_STORAGE"  # a database URL shared by several machines; empty: the journal

# The search space, written once. Learning rate and weight decay have one range per optimizer
# (ct.trainer.engine.OPTIMIZERS; Optuna names them lr_sgd, ...): their scales differ by 1000x.
LR: dict[str, FloatDistribution] = {
    # Nesterov at batch 256-1024: the plain recipe takes 0.4, the default preset 0.8.
    "sgd": FloatDistribution(0.05, 1.0, log=True),
    "adam": FloatDistribution(3e-4, 1e-2, log=True),  # around Adam's usual 1e-3..3e-3
    "adamw": FloatDistribution(3e-4, 1e-2, log=True),
}
WEIGHT_DECAY: dict[str, FloatDistribution] = {
    "sgd": FloatDistribution(5e-5, 5e-3, log=True),  # L2 in the gradient; 5e-4 is the classic
    "adam": FloatDistribution(1e-6, 1e-3, log=True),  # L2 through Adam's scaling: keep it small
    "adamw": FloatDistribution(1e-3, 0.3, log=True),  # decoupled decay: large values are normal
}
LR["muon"], WEIGHT_DECAY["muon"] = LR["sgd"], WEIGHT_DECAY["sgd"]  # SGD drives its non-filters
# Epochs: more almost always help; --max-epochs' default, 24, is where one trial of the plain
# recipe's width eats a tenth of --time-budget's default hour on 2 CPU cores.
MIN_EPOCHS = 4
SHARED: dict[str, BaseDistribution] = {
    "batch_size": IntDistribution(128, 1024, step=128),  # smaller: more steps, slower per image
    # Stem channels; cost grows with the square: 32 costs 4x the plain recipe's 16 per epoch, and
    # a wider trial would eat most of a 20-minute round on 2 CPU cores.
    "width": IntDistribution(8, 32, step=8),
    "convs_per_block": IntDistribution(1, 2),  # a second conv per block: deeper, ~1.6x the cost
    "dropout": FloatDistribution(0.0, 0.3),  # before the classifier; more only slows learning
    "label_smoothing": FloatDistribution(0.0, 0.3),  # plain 0.2, default 0.1; past 0.3 hurts
}
TUNED_KEYS = ("optimizer", "lr", "weight_decay", "epochs", *SHARED)  # what the search sets

PRUNERS = ("median", "halving", "hyperband", "none")
PRUNE_STEPS = 10  # trials report at tenths of their schedule, so short and long ones compare
N_STARTUP = 4  # random trials before TPE models the results (across all rounds of the study)
BASE_ATTR = "base"  # trial user attr: the round's base config, never pruned
RECIPE_ATTR = "recipe"  # trial user attr: the default preset's config, never pruned
SOURCE_ATTRS = (BASE_ATTR, RECIPE_ATTR)  # an enqueued config's origin, kept by its retry


def source_of(trial: optuna.Trial | FrozenTrial) -> str:
    """Where a trial's config came from: "base", "recipe" or "sampled"."""
    return next((attr for attr in SOURCE_ATTRS if trial.user_attrs.get(attr)), "sampled")


def search_space(optimizers: list[str], max_epochs: int,
                 base: dict[str, Any]) -> dict[str, BaseDistribution]:
    """Every distribution a trial may draw from, by Optuna name; a key the base config's network
    ignores (`network.ignored_keys`) is left out, so no trial is spent on a flat axis."""
    space: dict[str, BaseDistribution] = {"optimizer": CategoricalDistribution(optimizers)}
    for name in optimizers:
        space[f"lr_{name}"] = LR[name]
        space[f"weight_decay_{name}"] = WEIGHT_DECAY[name]
    low = min(MIN_EPOCHS, max_epochs)
    space["epochs"] = IntDistribution(low, max_epochs, step=2 if (max_epochs - low) % 2 == 0 else 1)
    return {**space, **{key: SHARED[key] for key in searched_shared_keys(base)}}


def searched_shared_keys(base: dict[str, Any]) -> list[str]:
    """The SHARED keys searched from `base`: those its network reads."""
    return [key for key in SHARED if key not in ignored_keys(base)]


def suggest(trial: optuna.Trial, optimizers: list[str], max_epochs: int,
            base: dict[str, Any]) -> dict[str, Any]:
    """Draw (or, for an enqueued trial, take) a trial's config keys."""
    space = search_space(optimizers, max_epochs, base)
    optimizer = _draw(trial, "optimizer", space["optimizer"])
    chosen = {"optimizer": optimizer,
              "lr": _draw(trial, f"lr_{optimizer}", space[f"lr_{optimizer}"]),
              "weight_decay": _draw(trial, f"weight_decay_{optimizer}",
                                    space[f"weight_decay_{optimizer}"])}
    for key in ("epochs", *searched_shared_keys(base)):
        chosen[key] = _draw(trial, key, space[key])
    return chosen


def _draw(trial: optuna.Trial, name: str, distribution: BaseDistribution) -> Any:
    with warnings.catch_warnings():  # an enqueued base config may lie outside a range
        warnings.simplefilter("ignore")
        if isinstance(distribution, CategoricalDistribution):
            return trial.suggest_categorical(name, distribution.choices)
        if isinstance(distribution, IntDistribution):
            return trial.suggest_int(name, distribution.low, distribution.high,
                                     step=distribution.step, log=distribution.log)
        assert isinstance(distribution, FloatDistribution)
        return trial.suggest_float(name, distribution.low, distribution.high,
                                   log=distribution.log)


def params_of(cfg: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """A config's values under the names of `base`'s search space: what enqueuing it fixes."""
    optimizer = cfg["optimizer"]
    return {"optimizer": optimizer, f"lr_{optimizer}": cfg["lr"],
            f"weight_decay_{optimizer}": cfg["weight_decay"], "epochs": cfg["epochs"],
            **{key: cfg[key] for key in searched_shared_keys(base)}}


def study_name(base: dict[str, Any], optimizers: list[str], max_epochs: int,
               dataset_sha256: str, validation_images: int) -> str:
    """Named by what the objective depends on; the seed and the searched keys are not in it, nor
    keys added later at the value that reproduces older runs (ct.trainer.config's
    without_legacy_values): a study begun before they existed goes on under its name."""
    fixed = {k: v for k, v in without_legacy_values(base).items()
             if k not in TUNED_KEYS and k != "seed"}
    space = {name: repr(d) for name, d in search_space(optimizers, max_epochs, base).items()}
    key = json.dumps({"space": space, "fixed": fixed, "data": dataset_sha256,
                      "validation": validation_images, "steps": PRUNE_STEPS}, sort_keys=True)
    return "cifar10-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    """The pruner by name (README "Tuning" has the measurements behind the default)."""
    if name == "median":  # prune below the median of earlier trials at the same tenth
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)
    if name == "halving":  # rungs at 1/10, 3/10 and 9/10 of the schedule keep the best third
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=PRUNE_STEPS,
                                              reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise UsageError(f"--pruner must be one of {', '.join(PRUNERS)}, not {name!r}")


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        # multivariate + group: models the optimizer and its own lr/decay together;
        # constant_liar: parallel workers do not all propose the same point.
        with warnings.catch_warnings():  # group is "experimental" since optuna 2.8
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=N_STARTUP,
                                              multivariate=True, group=True,
                                              constant_liar=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise UsageError(f"--sampler must be tpe or random, not {name!r}")


def storage_description(workspace: Path) -> str:
    """Where the study lives, without secrets: for logs, best.json and the mail."""
    url = os.environ.get(STORAGE_ENV, "").strip()
    return redact_url(url) if url else names.TUNE_JOURNAL


# query parameters that carry a secret (libpq's password and sslpassword, and the like)
_SECRET_KEY = re.compile(r".*(pass|pwd|secret|token|key).*", re.I)
HIDDEN = "***"


def redact_url(url: str) -> str:
    """A storage URL without its secrets: no user or password before the host, and the value of
    every query parameter named like a secret (?password=...) hidden."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return HIDDEN  # not a URL: nothing of it is known to be safe to show
    where, qsep, query = rest.partition("?")
    host = where.rpartition("@")[2]
    pairs = [pair.partition("=") for pair in query.split("&")] if qsep else []
    shown = "&".join(f"{key}={HIDDEN}" if _SECRET_KEY.fullmatch(unquote(key)) else
                     f"{key}{eq}{value}" for key, eq, value in pairs)
    return f"{scheme}://{host}" + (f"?{shown}" if qsep else "")


def url_secrets(url: str) -> list[str]:
    """The secrets a storage URL holds, as they may appear in a message: the password (and user
    info) before the host and every secret-named query value, quoted and unquoted."""
    _, _, rest = url.partition("://")
    where, _, query = rest.partition("?")
    user, colon, password = where.rpartition("@")[0].partition(":")
    found = [f"{user}:{password}", password] if colon else []  # a user alone is no secret
    found += [value for key, _, value in (pair.partition("=") for pair in query.split("&"))
              if _SECRET_KEY.fullmatch(unquote(key))]
    found += [unquote(secret) for secret in found]
    return sorted({secret for secret in found if secret}, key=len, reverse=True)


def redact(text: str, url: str | None = None) -> str:
    """`text` (an error from the driver, say) with every secret of the storage URL ($CT_TUNE_STORAGE
    unless given) replaced: the URL itself by its redacted form, the rest by ***."""
    url = os.environ.get(STORAGE_ENV, "").strip() if url is None else url
    if not url:
        return text
    text = text.replace(url, redact_url(url))
    for secret in url_secrets(url):
        text = text.replace(secret, HIDDEN)
    return text


def open_storage(workspace: Path) -> optuna.storages.BaseStorage:
    """$CT_TUNE_STORAGE (a database URL) or the journal file in the workspace; UsageError with
    one line when it cannot be used."""
    url = os.environ.get(STORAGE_ENV, "").strip()
    where = storage_description(workspace)
    try:
        if not url:
            path = workspace / names.TUNE_JOURNAL
            path.parent.mkdir(parents=True, exist_ok=True)
            backend = optuna.storages.journal.JournalFileBackend(str(path))
            storage = optuna.storages.journal.JournalStorage(backend)
        else:
            storage = optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
        storage.get_all_studies()  # reads the journal / connects now, not mid-round
    except UsageError:
        raise
    except Exception as exc:  # sqlalchemy, the driver and the journal raise many types
        said = redact(str(exc), url).strip()
        detail = said.splitlines()[0][:200] if said else ""
        hint = ("check CT_TUNE_STORAGE (postgresql+psycopg2://user:password@host:port/db) and "
                "that the server answers" if url else
                f"move {names.TUNE_JOURNAL} aside to start a new study")
        raise UsageError(f"tuning storage {where} is unusable ({exc.__class__.__name__}: "
                         f"{detail}); {hint}") from exc
    return storage


# --- a round's trials in the study ----------------------------------------------------------

ROUND_ATTR = "round"  # trial user attr: the round (run id) a slot belongs to
WORKER_ATTR = "worker"  # trial user attr: who runs it
HEARTBEAT_ATTR = "heartbeat"  # trial user attr: time.time() of its last sign of life
RESUME_ATTR = "resume_from"  # a retry's user attr: the number of the trial it replaces
ENDED_ATTR = "ended"  # why a trial failed: time budget, worker lost, ...


@dataclass
class Round:
    """A round's view of the study: its slots, popped and told by any worker."""

    study: optuna.Study
    run_id: str

    def trials(self, states: tuple[TrialState, ...] | None = None) -> list[FrozenTrial]:
        return [t for t in self.study.get_trials(deepcopy=False, states=states)
                if t.user_attrs.get(ROUND_ATTR) == self.run_id]

    def enqueue(self, params: dict[str, Any], **attrs: Any) -> None:
        with warnings.catch_warnings():  # a base config outside the ranges is tried as it is
            warnings.simplefilter("ignore")
            self.study.enqueue_trial(params, user_attrs={ROUND_ATTR: self.run_id, **attrs})

    def open_slots(self, base_params: dict[str, Any], count: int,
                   recipe_params: dict[str, Any] | None = None) -> bool:
        """Enqueue the round's slots once: the base config first, so the round never ends below
        it on validation, then the default recipe (a known good point, which a short round on
        few cores cannot count on sampling), then slots for the sampler. False when an earlier
        start of this round had done it."""
        if self.trials():
            return False
        self.enqueue(base_params, **{BASE_ATTR: True})
        if recipe_params is not None and count > 1:
            self.enqueue(recipe_params, **{RECIPE_ATTR: True})
            count -= 1
        for _ in range(count - 1):
            self.enqueue({})
        return True

    def pop(self, worker: str) -> optuna.Trial | None:
        """The next waiting slot of this round, now RUNNING for `worker`; None when none is left.
        The storage makes WAITING -> RUNNING succeed for one caller only."""
        storage = self.study._storage
        for frozen in self.trials(states=(TrialState.WAITING,)):
            try:
                if not storage.set_trial_state_values(frozen._trial_id, TrialState.RUNNING):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trial = optuna.Trial(self.study, frozen._trial_id)
            trial.set_user_attr(WORKER_ATTR, worker)
            beat(trial)
            return trial
        return None

    def retry_lost(self, worker: str, stale_after: float) -> list[int]:
        """Fail and re-enqueue the round's RUNNING trials whose worker is gone: `worker`'s own
        (this process restarted after it was killed) and any without a heartbeat for
        `stale_after` seconds. Returns the numbers this call retried."""
        retried = []
        now = time.time()
        for frozen in self.trials(states=(TrialState.RUNNING,)):
            mine = frozen.user_attrs.get(WORKER_ATTR) == worker
            stale = now - last_sign_of_life(frozen) > stale_after
            if not (mine or stale) or not self._fail(frozen, "worker lost; retried"):
                continue
            kept = {k: v for k, v in frozen.user_attrs.items() if k in SOURCE_ATTRS}
            self.enqueue(frozen.params, **{RESUME_ATTR: frozen.number}, **kept)
            retried.append(frozen.number)
        return retried

    def close(self) -> None:
        """Slots never started (the budget ran out) end as FAIL, so no later pop finds them."""
        for frozen in self.trials(states=(TrialState.WAITING,)):
            self._fail(frozen, "not started: the round's time budget ran out")

    def _fail(self, frozen: FrozenTrial, why: str) -> bool:
        """FAIL a trial; False when another worker finished or failed it first."""
        storage = self.study._storage
        try:
            storage.set_trial_user_attr(frozen._trial_id, ENDED_ATTR, why)
            storage.set_trial_state_values(frozen._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
        return True

    def counts(self) -> dict[str, int]:
        trials = self.trials()
        return {"finished": sum(t.state == TrialState.COMPLETE for t in trials),
                "pruned": sum(t.state == TrialState.PRUNED for t in trials),
                "retried": sum(t.user_attrs.get(ENDED_ATTR, "").endswith("retried")
                               for t in trials)}


def last_sign_of_life(frozen: FrozenTrial) -> float:
    """time.time() of the trial's last heartbeat, or of its start when it has none yet (a worker
    that has just popped it has not beaten yet, and is not lost)."""
    started = frozen.datetime_start.timestamp() if frozen.datetime_start else 0.0
    return max(float(frozen.user_attrs.get(HEARTBEAT_ATTR, 0.0)), started)


def beat(trial: optuna.Trial) -> None:
    trial.set_user_attr(HEARTBEAT_ATTR, round(time.time(), 1))


@contextmanager
def heartbeat(trial: optuna.Trial, stale_after: float) -> Iterator[None]:
    """Beat four times per `stale_after` while the trial runs, from a thread, so a long epoch
    never makes a live worker look lost. A trial another worker took over stops the beating."""
    stop = threading.Event()

    def beating() -> None:
        while not stop.wait(stale_after / 4):
            try:
                beat(trial)
            except optuna.exceptions.UpdateFinishedTrialError:
                return
            except Exception:  # a storage hiccup: the next beat may pass
                continue

    thread = threading.Thread(target=beating, name=f"heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def report(trial: optuna.Trial, reported: int, epoch: int, epochs: int, accuracy: float) -> int:
    """Report `accuracy` at every tenth of the schedule reached since the last report (they
    all see the latest value); returns the last tenth reported."""
    tenth = epoch * PRUNE_STEPS // epochs
    for step in range(reported + 1, tenth + 1):
        trial.report(accuracy, step)
    return max(reported, tenth)
