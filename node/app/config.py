"""Load :class:`shared.settings.Settings` from a TOML file, the environment and flags (later ones win)."""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from shared.errors import ConfigError
from shared.settings import Settings

ENV_PREFIX = "NETQ_"
KEY_FILE = "farm.key"  # in data_dir: the farm key that `netq init` and `netq join` write (docs/security.md)


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """``NETQ_NODE_ID=a`` → ``node_id``; ``NETQ_BROKER__URL=...`` → ``broker.url`` (values parsed as TOML)."""
    out: dict[str, Any] = {}
    fields = Settings.model_fields
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = name[len(ENV_PREFIX):].lower().split("__")
        # Only names that spell a setting: NETQ_NODE_ID, NETQ_BROKER__URL. Others (NETQ_CONFIG, NETQ_BROKER
        # for the CLI's --broker) belong to someone else.
        sectioned = isinstance(fields.get(path[0]) and fields[path[0]].default, BaseModel)
        if path[0] not in fields or (len(path) == 1) == sectioned:
            continue
        try:
            value: Any = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def _dotted(flags: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dotted, value in flags.items():
        if value is None:
            continue
        parts = dotted.split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def load_settings(path: Path | None = None, flags: Mapping[str, Any] | None = None,
                  environ: Mapping[str, str] | None = None) -> Settings:
    """Defaults, then the TOML file, then ``NETQ_*`` variables, then flags given as ``{"section.key": v}``."""
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    if path is None and environ.get("NETQ_CONFIG"):
        path = Path(environ["NETQ_CONFIG"])
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    data = _merge(data, _from_env(environ))
    data = _merge(data, _dotted(flags or {}))
    data.setdefault("node_id", _default_node_id())
    data.setdefault("data_dir", str(Path.home() / ".local/share/netqueues"))
    farm = data.get("farm", {})
    keyless = isinstance(farm, dict) and "key" not in farm and not farm.get("open")
    if keyless and isinstance(data["data_dir"], str):
        stored = read_key_file(Path(data["data_dir"]))
        if stored is not None:
            data["farm"] = {**farm, "key": stored}
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors()[:10]:
            loc = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError("invalid settings:\n" + "\n".join(lines)) from exc


def _default_node_id() -> str:
    host = socket.gethostname().split(".")[0]
    cleaned = "".join(c if c.isalnum() or c in "-_" else "-" for c in host).strip("-_")
    return cleaned[:64] or "node"


# --- the farm key file --------------------------------------------------------------------------------------
def read_key_file(data_dir: Path) -> str | None:
    """The farm key kept in ``<data_dir>/farm.key`` (None: there is none). ``[farm] key`` and
    ``NETQ_FARM__KEY`` win over it; ``[farm] open = true`` ignores it."""
    path = data_dir / KEY_FILE
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read the farm key file {path}: {exc.strerror}") from exc


def write_key_file(data_dir: Path, key: str, *, replace: bool = False) -> Path:
    """Keep ``key`` in ``<data_dir>/farm.key`` (mode 0600). An existing key is replaced only when asked:
    another key makes this node a member of another farm."""
    path = data_dir / KEY_FILE
    if not replace and path.exists():
        raise ConfigError(f"{path} already holds a farm key; a new one would take this node out of its farm")
    write_private(path, key + "\n")
    return path


def write_private(path: Path, text: str) -> None:
    """Write a secret file atomically with mode 0600, creating its directory (0700) if missing. Run as root
    in a data directory that belongs to the service's user, the file goes to that user, so that the node can
    read it."""
    directory = path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = directory / f".{path.name}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)  # O_EXCL below: a left-over file's mode must not be the one we keep
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                os.write(fd, text.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            st = directory.stat()
            if os.geteuid() == 0 and st.st_uid != 0:
                os.chown(tmp, st.st_uid, st.st_gid)
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from exc
