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
