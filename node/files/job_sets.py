"""Job sets from G-code files and ``.gjob`` archives, and ``.gjob`` manifests from queued jobs.

What a set needs (printer profile, nozzle, materials, extents, duration) is read from the slicer's header
(:mod:`shared.gcode_meta`) wherever the user did not say. Inferred materials carry the type only: slicers write
colours as ``#rrggbb`` while operators name loaded filament ``red``, so a colour is required only when a person
(or a Continuous Print manifest) gave one. Extents are filled only when the caller says every printer of the
farm declares its bed size (``printer.bed_mm``): the scheduler refuses a job with extents to a printer whose
bed is unknown, so inferring them on such a farm would make ordinary files unprintable.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from shared.errors import ArchiveError
from shared.gcode_meta import GcodeMeta, GcodeMetaParser, iter_lines
from shared.gjob import GjobSet, Manifest, MaterialKey

CHUNK = 1 << 20


def read_meta(chunks: Iterable[bytes]) -> GcodeMeta:
    """Parse a whole G-code file (header, moves and footer) given as byte chunks."""
    parser = GcodeMetaParser()
    for line in iter_lines(chunks):
        parser.feed(line)
    return parser.result()


def file_chunks(path: Path) -> Iterable[bytes]:
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            yield chunk


def read_file_meta(path: Path) -> GcodeMeta:
    return read_meta(file_chunks(path))


def inferred(meta: GcodeMeta, *, extents: bool = True) -> dict[str, Any]:
    """Set fields (``shared.models.JobSet`` / the ``job/add`` body) that the header tells."""
    out: dict[str, Any] = {}
    if meta.printer_model:
        out["profiles"] = [meta.printer_model[:200]]
    if meta.nozzle_mm is not None and 0 < meta.nozzle_mm <= 5:
        out["nozzle_mm"] = meta.nozzle_mm
    tools = sorted((m for m in meta.materials if m.type), key=lambda m: m.tool)
    if tools:
        materials: list[dict[str, Any] | None] = [None] * (tools[-1].tool + 1)
        for m in tools:
            materials[m.tool] = {"type": str(m.type)[:32], "color": None}
        out["materials"] = materials[:16]
    if extents and meta.extents is not None and all(v > 0 for v in meta.extents.max_xyz):
        out["extents_mm"] = list(meta.extents.max_xyz)
    if meta.estimated_s is not None and 0 <= meta.estimated_s <= 30 * 86400:
        out["duration_s"] = float(meta.estimated_s)
    return out


def beds_known(nodes: Iterable[dict[str, Any]]) -> bool:
    """Whether every printer in a ``node/list`` answer declares its bed size."""
    caps = [n.get("capabilities") for n in nodes if not n.get("witness") and n.get("capabilities")]
    return bool(caps) and all(c.get("bed_mm") for c in caps if c is not None)


def fill_set(given: dict[str, Any], meta: GcodeMeta, *, extents: bool = True) -> dict[str, Any]:
    """``given`` with every field the user left out (absent, None or empty) taken from the header."""
    out = dict(given)
    for key, value in inferred(meta, extents=extents).items():
        if out.get(key) in (None, [], ()):
            out[key] = value
    return out


def material_from_key(key: str | None) -> dict[str, Any] | None:
    """Continuous Print's ``PLA_red_#ff0000`` → ``{"type": "PLA", "color": "red"}`` (None: any material)."""
    if not key:
        return None
    mk = MaterialKey.parse(key)
    if not mk.type:
        return None
    colour = mk.colour_name or mk.colour
    return {"type": mk.type[:32], "color": colour[:32] if colour else None}


def material_key(material: dict[str, Any] | None) -> str | None:
    if not material:
        return None
    return f"{material['type']}_{material['color']}" if material.get("color") else str(material["type"])


def job_from_manifest(manifest: Manifest, shas: dict[str, str], holder: str,
                      metas: dict[str, GcodeMeta] | None = None, *, extents: bool = True) -> dict[str, Any]:
    """A ``job/add`` body for an imported archive (``shas``: set path → sha256, already on ``holder``)."""
    sets = []
    for s in manifest.sets:
        if s.count == 0:
            continue  # Continuous Print keeps sets with nothing to print
        body: dict[str, Any] = {
            "file": PurePosixPath(s.path).name[:200], "sha256": shas[s.path], "count": s.count,
            "holders": [holder], "materials": [material_from_key(m) for m in s.materials][:16],
            "profiles": list(s.profiles),
        }
        while body["materials"] and body["materials"][-1] is None:
            body["materials"].pop()  # "" on a tool is "any": no requirement, so no tool the printer must have
        if s.estimated_print_time is not None:
            body["duration_s"] = min(float(s.estimated_print_time), 30 * 86400.0)
        if metas and s.path in metas:
            body = fill_set(body, metas[s.path], extents=extents)
        sets.append(body)
    if not sets:
        raise ArchiveError("the archive's manifest has no set with a count above 0")
    if manifest.count == 0:
        raise ArchiveError("the archive's manifest asks for 0 copies")
    job: dict[str, Any] = {"count": manifest.count, "sets": sets}
    if manifest.name:
        job["name"] = manifest.name[:200]
    return job


def manifest_from_job(job: dict[str, Any]) -> tuple[Manifest, dict[str, str]]:
    """The ``.gjob`` manifest of a queued job, and its files (archive path → sha256)."""
    paths: dict[str, str] = {}  # archive path -> sha
    sets = []
    for i, s in enumerate(job["sets"]):
        name = PurePosixPath(str(s["file"]).replace("\\", "/")).name or f"set{i}.gcode"
        path = name
        if paths.get(path, s["sha256"]) != s["sha256"]:
            path = f"{i}-{name}"  # two different files under one name
        paths[path] = s["sha256"]
        sets.append(GjobSet(path=path, count=int(s["count"]),
                            materials=tuple(material_key(m) for m in s.get("materials") or []),
                            profiles=tuple(s.get("profiles") or []),
                            estimated_print_time=None if s.get("duration_s") is None
                            else float(s["duration_s"])))
    manifest = Manifest(name=str(job.get("name") or job["id"]), count=int(job.get("count") or 1),
                        sets=tuple(sets))
    return manifest, paths
