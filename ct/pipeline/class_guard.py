"""The per-class guard of promotion, and the per-class view it reads. Standard library only.

CT_MAX_CLASS_DROP (points; empty: off) refuses a run that beats the best model overall when any
class's test accuracy fell by more than that against the best's per-class accuracy measured on
the same test set (ct.pipeline.promote hands over the best's numbers on the run's test set). The
mail (ct.pipeline.notify) and the report (ct.pipeline.report) compare per class with the same
functions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ct.pipeline.errors import PipelineError
from ct.pipeline.records import fmt_number, is_percentage
from ct.workspace import BEST_FILE

MAX_CLASS_DROP = "CT_MAX_CLASS_DROP"  # the per-class guard's setting (scripts/lib.sh: empty, off)


def max_class_drop(env: Mapping[str, str]) -> float | None:
    """CT_MAX_CLASS_DROP in points; None when empty (the guard is off)."""
    text = env.get(MAX_CLASS_DROP, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise PipelineError(
            f"{MAX_CLASS_DROP} {text!r} is not a number of points >= 0; nothing promoted; set "
            f"it to e.g. 2 (a class may lose at most 2 points), or empty to turn the guard off")
    return value


def per_class(record: Any) -> dict[str, float] | None:
    """A run summary's (or best.json's) test accuracy per class, in label order (its `classes`,
    when they name the same classes); None when it records none (runs from before the per-class
    view, tuning rounds). A class the test had no image of is left out."""
    values = record.get("per_class_accuracy") if isinstance(record, Mapping) else None
    if not isinstance(values, dict):
        return None
    classes = record.get("classes")
    named = isinstance(classes, list) and all(isinstance(c, str) for c in classes)
    order = classes if named and set(classes) == set(values) else values
    found = {name: values[name] for name in order if is_percentage(values[name])}
    return found or None


@dataclass(frozen=True)
class ClassChange:
    name: str
    now: float  # the challenger's accuracy on the class, percent
    before: float  # the champion's

    @property
    def change(self) -> float:
        return round(self.now - self.before, 2)  # both have 2 decimals: no float noise


def class_changes(challenger: Any, champion: Any) -> list[ClassChange] | None:
    """Per class both records have, in the challenger's order; None when either has none."""
    now, before = per_class(challenger), per_class(champion)
    if now is None or before is None:
        return None
    changes = [ClassChange(name, now[name], before[name]) for name in now if name in before]
    return changes or None


def worse_text(changes: Sequence[ClassChange], limit: float = 0.0) -> str:
    """ "cat -3.2, dog -1.1": the classes that lost more than `limit` points, most first."""
    worse = sorted((c for c in changes if -c.change > limit), key=lambda c: c.change)
    return ", ".join(f"{c.name} {fmt_number(c.change)}" for c in worse)


def class_guard(metrics: Mapping[str, Any], best: Mapping[str, Any], limit: float
                ) -> tuple[bool, str]:
    """(refused, why) for a run better overall than the best: refused when a class fell by more
    than `limit` points; else the text says what the guard checked, or why it could not."""
    changes = class_changes(metrics, best)
    if changes is None:
        whose = "this run" if per_class(metrics) is None else f"the best model's {BEST_FILE}"
        return False, (f"the per-class guard ({MAX_CLASS_DROP}={fmt_number(limit)}) could not "
                       f"compare: {whose} records no per-class accuracy")
    dropped = worse_text(changes, limit)
    if dropped:
        return True, (f"the per-class guard refuses it: against run {best.get('run_id')}, "
                      f"{dropped} (points; {MAX_CLASS_DROP} allows {fmt_number(limit)})")
    return False, f"per-class guard: no class lost more than {fmt_number(limit)} points"
