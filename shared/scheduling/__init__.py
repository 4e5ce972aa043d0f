"""Which job copy goes to which printer: compatibility, the choice among compatible copies, and a farm
simulator that measures the choice. Pure code: no I/O, no clock; time is passed in as ``now`` (POSIX s).

The arbiter calls, for a printer that asks for work::

    choice = choose(printer, candidates, now, params, farm)   # Choice | None

and grants ``choice.copy`` (``choice.job_id``, ``choice.copy_index``); ``choice.reason`` is one line for
logs and ``netq``. ``None`` means the printer can print none of the candidates.

How the arbiter maps its state to the scheduler's view (build the views once per job revision and per
printer-state change, not per request: they precompute what the decision needs):

:class:`PrinterView` — from the node's work request and its retained state:

* ``node_id``; ``profile``: the Continuous Print profile name (``"Prusa i3 MK3S+"``); ``aliases``: other names
  the printer answers to in a set's profile list (the profile's model or extra tags, e.g. ``"MK3S"``).
* ``namespaces``: the namespaces it serves, in its own order of preference (first = preferred).
* ``loaded``: one :class:`Material` per tool, ``None`` where unknown or empty (length = number of tools).
* ``nozzle_mm`` (``None`` = unknown: it then gets no job that names a nozzle), ``bed_mm`` = (width, depth,
  height) of the build volume (``None`` = unknown: no job with extents), ``circular_bed`` for deltas.
* ``material_types``: types it can print at all (empty = any); ``tags``: free-form capabilities
  (``"ejector"``, ``"enclosure"``); ``self_clearing``: it clears its own bed after a print.
* ``allow_swaps``: False if it must only get work matching what is loaded (no operator can reach it).
* ``operator``: the :class:`OperatorSchedule` in force, from the settings' ``[scheduler]`` section
  (``settings.scheduler.operators(now)``: ``ALWAYS`` if no shifts are configured, ``NEVER`` for ``[]``).

:class:`CopyView` — one per queued copy, all namespaces (state ``queued``; never claimed, printing or
finished ones; ``choose`` skips what the printer cannot print, and uses the rest's work to judge how long the
queue is):

* ``job_id``, ``copy`` (copy index), ``namespace``; ``rank``: the job's position in its namespace's queue
  (0 = top, any increasing integers); ``priority``: the user's priority (higher first, default 0).
* ``enqueued_at``: when this copy entered the queue, or re-entered it after a lapsed grant (aging counts
  from it; keep the original time if a returned copy should not lose its place).
* ``sets``: one :class:`PrintSet` per set of the job, in print order: ``file`` (name), ``duration_s``
  (estimate from the G-code), ``count``, ``materials`` (one :class:`Material` or ``None`` per tool the file
  uses), ``profiles`` (allowed profiles; empty = any), ``nozzle_mm``, ``extents_mm`` = (x, y, z).
* ``tags``: printer tags the job requires.

:class:`FarmView` (optional, recommended): the online printers' views; lets the choice keep scarce printers
for the work only they can do, and pull forward copies that would otherwise end after the rest of the queue.
Rebuild it when a printer joins, leaves or changes capabilities (not when only loaded material changes).

:class:`SchedulerParams` comes from the same section (``settings.scheduler.params()``). Submission and ``netq jobs`` use
:func:`why_unprintable` (enrolled printers with ``consider_loaded=False`` to refuse a job; online printers
to say why a queued job waits), and :func:`compatible` for one printer.
"""

from .compat import Compat, compatible, make_filter, why_unprintable
from .model import Choice, CopyView, Material, PrinterView, PrintSet
from .operators import ALWAYS, NEVER, OperatorSchedule, Shift
from .params import SchedulerParams
from .policy import FarmView, choose

__all__ = [
    "ALWAYS",
    "NEVER",
    "Choice",
    "Compat",
    "CopyView",
    "FarmView",
    "Material",
    "OperatorSchedule",
    "PrintSet",
    "PrinterView",
    "SchedulerParams",
    "Shift",
    "choose",
    "compatible",
    "make_filter",
    "why_unprintable",
]
