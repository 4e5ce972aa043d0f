"""Pure membership rules: who may be enrolled, and what retiring a member changes.

A membership change is one committed change of one member (the arbiter keeps them one at a time), so the
quorums of consecutive memberships always overlap. A retired member keeps its record, marked ``retired_at``:
it counts towards no quorum and its node id is never enrolled again.
"""

from __future__ import annotations

from collections.abc import Iterable

from shared import claims
from shared.errors import RequestError
from shared.models import Member, member_key
from shared.state import MEMBER_WEIGHT, FarmState, has_quorum, quorum_weight


def enrollment(node: str, *, witness: bool, now: float) -> Member:
    """The record the arbiter enrolls ``node`` with. The weight is the farm's rule (every member, witness or
    printer, weighs MEMBER_WEIGHT), never the asking node's word: a join carries no weight."""
    return Member(node_id=node, weight=MEMBER_WEIGHT, witness=witness, enrolled_at=now)


def refuse_enrollment(state: FarmState, node: str) -> str | None:
    """Why ``node`` may not be enrolled (None if it may)."""
    retired = state.retired().get(node)
    if retired is not None:
        return (f"{node} was retired from this farm; a retired node id is never enrolled again "
                f"(run the machine with a new node id to add it back)")
    return None


def retire(state: FarmState, node: str, *, arbiter: str | None, reachable: Iterable[str],
           now: float) -> claims.Change:
    """Retire member ``node``: its claimed copies go back to the queue, a copy it is printing becomes
    ``orphaned`` (never re-queued on a timeout), and its record is marked retired.

    Refused (RequestError), changing nothing: a node that is not a member; the arbiter itself (it would go on
    deciding for a farm it is no longer part of: stop it first, another member takes over); the last printer
    member (the queue could never be printed); and a change whose remaining ``reachable`` members (the ones the
    arbiter hears) lack quorum weight of the new membership: it could not be committed, and the farm would stop.
    """
    members = state.members()
    member = members.get(node)
    if member is None:
        if node in state.retired():
            raise RequestError(f"{node} is already retired")
        raise RequestError(f"no member {node!r} in this farm; members: {', '.join(sorted(members)) or 'none'}")
    if node == arbiter:
        if has_quorum(set(reachable) - {node}, members):
            how = "stop its node agent (another member takes over within seconds), then retire it"
        else:
            how = ("the others cannot elect an arbiter without it: enroll another member first (a witness will "
                   "do), then stop it and retire it")
        raise RequestError(f"{node} is the arbiter and cannot retire itself: {how}")
    rest = {n: m for n, m in members.items() if n != node}
    if not rest:
        raise RequestError(f"{node} is the farm's last member")
    if not member.witness and all(m.witness for m in rest.values()):
        raise RequestError(f"{node} is the farm's last printer: enroll its replacement first, then retire it")
    live = sorted(n for n in set(reachable) if n in rest)
    if not has_quorum(live, rest):
        away = sorted(set(rest) - set(live))
        raise RequestError(
            f"retiring {node} leaves {len(rest)} members that need weight {quorum_weight(rest)} to commit, but "
            f"{', '.join(away)} {'is' if len(away) == 1 else 'are'} unreachable: bring "
            f"{'it' if len(away) == 1 else 'them'} back first, or the farm could not commit anything")
    change = claims.node_gone(state, node, now, reason=f"{node} was retired")
    retired = member.model_copy(update={"retired_at": now})
    change.writes.append((member_key(node), retired.model_dump(mode="json")))
    change.events.append({"event": "retired", "node": node, "witness": member.witness})
    return change


def summary(change: claims.Change) -> dict[str, list[dict[str, object]]]:
    """The copies a retirement released and orphaned, as ``{"released": [...], "orphaned": [...]}``."""
    out: dict[str, list[dict[str, object]]] = {"released": [], "orphaned": []}
    for ev in change.events:
        kind = ev.get("event")
        if kind in out:
            out[kind].append({"namespace": ev["namespace"], "job": ev["job"], "copy": ev["copy"]})
    return out
