"""The scheduler's tunable parameters, validated once and passed down (part of the farm's settings).

Every cost is in seconds of printer time, so that the weights compare things a farm can measure.
:doc:`docs/scheduling.md` explains each default.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

HOUR = 3600.0


class SchedulerParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_wait_s: float = Field(default=48 * HOUR, gt=0)
    """A copy that has waited this long is *overdue*: overdue copies go first, oldest first, ahead of any
    namespace order, priority or material preference. This is what bounds every copy's wait."""

    aging_weight: float = Field(default=0.1, ge=0)
    """Below the bound, each second of waiting lowers a copy's cost by this many seconds: priority rises
    steadily with the wait, gently enough that loaded material still counts for more within a few hours."""

    swap_cost_s: float = Field(default=4 * HOUR, ge=0)
    """Cost of one tool's material swap: the operator's work, the printer idle meanwhile, purge waste and the
    chance of a mistake. A copy needing a swap is taken over one that does not only if it is this much
    cheaper on the other terms (for example 40 h older at the default aging weight)."""

    length_weight: float = Field(default=0.05, ge=0)
    """Each second of printing in a copy lowers its cost by this many seconds: longer copies first, so that the
    end of the queue is made of short copies that spread evenly over printers (the LPT rule for makespan)."""

    flexibility_cost_s: float = Field(default=2 * HOUR, ge=0)
    """Used when the caller passes the farm: a copy every printer could print costs this much more than a copy
    only the asking printer can print, so scarce capabilities go to the work that needs them."""

    swap_s: float = Field(default=10 * 60, ge=0)
    """Estimated operator time to swap one tool's filament (the printer waits meanwhile)."""

    clear_s: float = Field(default=3 * 60, ge=0)
    """Estimated operator time to clear a bed on a printer that does not clear itself."""

    self_clear_s: float = Field(default=2 * 60, ge=0)
    """Estimated time a self-clearing printer takes to clear its own bed."""
