"""The scheduler's tunable parameters, validated once and passed down (part of the farm's settings).

Every cost is in seconds of printer time, so that the weights compare things a farm can measure.
``docs/scheduling.md`` explains each default.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

HOUR = 3600.0


class SchedulerParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_wait_s: float = Field(default=72 * HOUR, gt=0)
    """A copy that has waited this long is *overdue*: overdue copies go first, ahead of any namespace order,
    priority or material preference. This is what bounds every copy's wait. Set it above the farm's usual
    queueing time: below it the choice becomes (nearly) first in, first out."""

    overdue_window_s: float = Field(default=12 * HOUR, ge=0)
    """Among overdue copies, the printer takes the cheapest (by the cost below) of those queued within this
    long of the oldest one, instead of strictly the oldest: an overloaded farm still groups materials. Must not
    exceed ``max_wait_s``."""

    namespace_cost_s: float = Field(default=2 * HOUR, ge=0)
    """Cost of each step down the printer's own list of namespaces. Below a swap's cost by default: a printer
    prefers its first namespace, but not at the price of a filament swap. Set it very high (1e9) to make the
    order strict, as in Continuous Print."""

    aging_weight: float = Field(default=0.1, ge=0)
    """Below the bound, each second of waiting lowers a copy's cost by this many seconds: priority rises
    steadily with the wait, gently enough that loaded material counts for more (a swap equals 40 h of wait)."""

    swap_cost_s: float = Field(default=4 * HOUR, ge=0)
    """Cost of one tool's material swap: the operator's work, the printer idle meanwhile, purge waste and the
    chance of a mistake. A copy needing a swap is taken over one that does not only if it is this much
    cheaper on the other terms."""

    length_weight: float = Field(default=0.0, ge=0)
    """Each second of printing in a copy lowers its cost by this many seconds: longer copies first (the LPT rule
    for makespan). Off by default: ``end_weight`` moves long copies forward only when the queue is short enough
    for them to matter, which measured as well or better on makespan and keeps mean waits shorter."""

    end_weight: float = Field(default=1.0, ge=0)
    """Used when the caller passes the farm: a copy longer than the queued work per printer would finish after
    the rest of the queue; each second by which it is longer lowers its cost by this many seconds."""

    flexibility_cost_s: float = Field(default=2 * HOUR, ge=0)
    """Used when the caller passes the farm: a copy every printer could print costs this much more than a copy
    only the asking printer can print, so scarce capabilities go to the work that needs them."""

    self_clearing_cost_s: float = Field(default=4 * HOUR, ge=0)
    """Used when the caller passes the farm: on a printer that needs an operator after every print and has
    operators only on shifts, a copy that a self-clearing printer of the farm could also print costs this much
    more. Self-clearing printers print through the night; such a printer does one print per night, so work
    both can print is better left to the self-clearing ones."""

    swap_s: float = Field(default=10 * 60, ge=0)
    """Estimated operator time to swap one tool's filament (the printer waits meanwhile)."""

    clear_s: float = Field(default=3 * 60, ge=0)
    """Estimated operator time to clear a bed on a printer that does not clear itself."""

    self_clear_s: float = Field(default=2 * 60, ge=0)
    """Estimated time a self-clearing printer takes to clear its own bed."""

    @model_validator(mode="after")
    def _window_within_bound(self) -> SchedulerParams:
        if self.overdue_window_s > self.max_wait_s:
            raise ValueError("overdue_window_s must not exceed max_wait_s")
        return self
