"""Compatibility: the hard rules, their reasons, and the "why can nobody print this" helper."""

from __future__ import annotations

from typing import Any

import pytest

from shared.scheduling import CopyView, Material, PrinterView, PrintSet, compatible, why_unprintable

PLA_BLACK = Material("PLA", "black")
PETG = Material("PETG", "white")
MK3 = "Prusa i3 MK3S+"


def printer(**kw: Any) -> PrinterView:
    base: dict[str, Any] = {
        "node_id": "p1",
        "profile": MK3,
        "namespaces": ("default",),
        "loaded": (PLA_BLACK,),
        "nozzle_mm": 0.4,
        "bed_mm": (250.0, 210.0, 210.0),
    }
    base.update(kw)
    return PrinterView(**base)


def job(*sets: PrintSet, **kw: Any) -> CopyView:
    base: dict[str, Any] = {"job_id": "j", "copy": 0, "namespace": "default", "enqueued_at": 0.0}
    base.update(kw)
    return CopyView(sets=sets or (PrintSet("a.gcode", 3600),), **base)


def pset(**kw: Any) -> PrintSet:
    base: dict[str, Any] = {"file": "a.gcode", "duration_s": 3600.0}
    base.update(kw)
    return PrintSet(**base)


def test_everything_fits() -> None:
    c = job(pset(materials=(PLA_BLACK,), profiles=frozenset({MK3}), nozzle_mm=0.4, extents_mm=(200, 200, 200)))
    assert compatible(printer(), c) == (True, "")


def test_profile_is_matched_by_name_or_alias_ignoring_case() -> None:
    c = job(pset(profiles=frozenset({"prusa i3 mk3s+"})))
    assert compatible(printer(), c).ok
    c = job(pset(profiles=frozenset({"MK3S"})))
    assert compatible(printer(aliases=frozenset({"MK3", "mk3s"})), c).ok
    ok, reason = compatible(printer(profile="Prusa Mini"), c)
    assert not ok and "sliced for MK3S, not Prusa Mini" in reason


def test_sets_must_share_a_profile() -> None:
    c = job(pset(profiles=frozenset({MK3})), pset(profiles=frozenset({"Prusa Mini"})))
    ok, reason = compatible(printer(), c)
    assert not ok and "none in common" in reason


def test_nozzle() -> None:
    c = job(pset(nozzle_mm=0.6))
    ok, reason = compatible(printer(), c)
    assert not ok and reason == "needs a 0.6 mm nozzle, printer has 0.4 mm"
    assert compatible(printer(nozzle_mm=0.6), c).ok
    assert compatible(printer(nozzle_mm=0.605), c).ok  # within tolerance
    ok, reason = compatible(printer(nozzle_mm=None), c)
    assert not ok and "unknown" in reason
    assert compatible(printer(nozzle_mm=None), job(pset())).ok  # no nozzle named, none needed
    ok, reason = compatible(printer(nozzle_mm=0.4), job(pset(nozzle_mm=0.4), pset(nozzle_mm=0.6)))
    assert not ok and "different nozzles" in reason


def test_bed_size() -> None:
    assert compatible(printer(), job(pset(extents_mm=(250, 210, 210)))).ok
    ok, reason = compatible(printer(), job(pset(extents_mm=(251, 10, 10))))
    assert not ok and "larger than the build volume 250×210×210 mm" in reason
    ok, _ = compatible(printer(), job(pset(extents_mm=(10, 10, 211))))
    assert not ok
    # The largest extent of any set counts.
    assert not compatible(printer(), job(pset(extents_mm=(10, 10, 10)), pset(extents_mm=(10, 300, 10)))).ok
    ok, reason = compatible(printer(bed_mm=None), job(pset(extents_mm=(10, 10, 10))))
    assert not ok and "unknown" in reason
    assert compatible(printer(bed_mm=None), job(pset())).ok


def test_round_bed() -> None:
    delta = printer(bed_mm=(110.0, 110.0, 120.0), circular_bed=True)
    assert compatible(delta, job(pset(extents_mm=(70, 70, 100)))).ok  # diagonal 99 mm
    ok, reason = compatible(delta, job(pset(extents_mm=(100, 100, 10))))  # diagonal 141 mm
    assert not ok and "round build volume" in reason


def test_tools_material_types_and_tags() -> None:
    two_tools = job(pset(materials=(PLA_BLACK, PETG)))
    ok, reason = compatible(printer(), two_tools)
    assert not ok and reason == "uses 2 tools, printer has 1"
    assert compatible(printer(loaded=(None, None)), two_tools).ok

    tpu = job(pset(materials=(Material("TPU", "red"),)))
    ok, reason = compatible(printer(material_types=frozenset({"PLA", "PETG"})), tpu)
    assert not ok and "needs TPU, which this printer does not print" in reason
    assert compatible(printer(material_types=frozenset({"tpu"})), tpu).ok
    assert compatible(printer(), tpu).ok  # no list: any material

    ejector = job(tags=frozenset({"Ejector"}))
    ok, reason = compatible(printer(), ejector)
    assert not ok and reason == "needs printer tag Ejector"
    assert compatible(printer(tags=frozenset({"ejector", "enclosure"})), ejector).ok


def test_loaded_material_matters_only_to_printers_that_take_no_swaps() -> None:
    petg = job(pset(materials=(PETG,)))
    assert compatible(printer(), petg).ok  # an operator will swap
    strict = printer(allow_swaps=False)
    ok, reason = compatible(strict, petg)
    assert not ok and "takes no material swaps" in reason
    assert compatible(strict, petg, consider_loaded=False).ok  # at submission, loading can change
    assert compatible(printer(allow_swaps=False, loaded=(Material("petg", "WHITE"),)), petg).ok
    # A requirement without a colour accepts any colour of that type; unknown loaded material never fits.
    assert compatible(strict, job(pset(materials=(Material("PLA"),)))).ok
    assert not compatible(printer(allow_swaps=False, loaded=(None,)), job(pset(materials=(Material("PLA"),)))).ok
    # Sets in two colours need a swap in between, which a strict printer cannot have.
    assert not compatible(strict, job(pset(materials=(PLA_BLACK,)), pset(materials=(Material("PLA", "red"),)))).ok


def test_why_unprintable() -> None:
    big = job(pset(extents_mm=(300, 300, 300)))
    printers = [printer(node_id=f"mk3-{i}") for i in range(5)] + [printer(node_id="mini", bed_mm=(180, 180, 180))]
    reason = why_unprintable(big, printers)
    assert reason is not None
    assert reason.startswith("no printer can print it (")
    assert "mk3-0, mk3-1, mk3-2 and 2 more: needs 300×300×300 mm" in reason
    assert "mini: needs 300×300×300 mm, larger than the build volume 180×180×180 mm" in reason

    assert why_unprintable(big, [*printers, printer(node_id="cr10", bed_mm=(300, 300, 400))]) is None
    assert why_unprintable(big, []) == "no printer is available"

    elsewhere = job(namespace="other")
    reason = why_unprintable(elsewhere, printers)
    assert reason is not None and "does not serve namespace 'other'" in reason
    assert why_unprintable(elsewhere, printers, check_namespace=False) is None


def test_invalid_views_are_refused() -> None:
    with pytest.raises(ValueError):
        PrintSet("a", 60, count=0)
    with pytest.raises(ValueError):
        PrintSet("a", float("nan"))
    with pytest.raises(ValueError):
        CopyView("j", 0, "default", (), 0.0)
    with pytest.raises(ValueError):
        printer(loaded=())


def test_swaps_inside_a_copy_are_counted_as_the_simulator_counts_them() -> None:
    black_any_black = job(
        pset(materials=(PLA_BLACK,)), pset(materials=(Material("PLA"),)), pset(materials=(PLA_BLACK,))
    )
    assert black_any_black.inner_swaps == 0  # "any PLA" keeps the black loaded
    black_red_black = job(
        pset(materials=(PLA_BLACK,)), pset(materials=(Material("PLA", "red"),)), pset(materials=(PLA_BLACK,))
    )
    assert black_red_black.inner_swaps == 2
    assert black_red_black.first_materials == (("pla", "black"),)
