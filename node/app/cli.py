"""``netq``: the command line. A thin layer over the library: it catches NetqError, prints it plainly, exits 1."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from shared.errors import NetqError

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="netqueues: shared print queues for a farm of 3D printers, with no server and no cloud.")
job_app = typer.Typer(no_args_is_help=True, help="Change queued jobs.")
node_app = typer.Typer(no_args_is_help=True, help="Farm membership and per-node commands.")
app.add_typer(job_app, name="job")
app.add_typer(node_app, name="node")
console = Console()
err = Console(stderr=True)
T = TypeVar("T")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file of the local node.",
                                                 envvar="NETQ_CONFIG")]
BrokerOpt = Annotated[str | None, typer.Option("--broker", help="mqtt://HOST:PORT of the farm's broker "
                                                "(default: the local node's, else found with zeroconf).",
                                                envvar="NETQ_BROKER")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _run(coro: Callable[[], Awaitable[T]]) -> T:
    if not logging.getLogger().handlers:
        # A command, not the agent: the MQTT link's reconnect chatter (e.g. while the demo's broker host is
        # killed) is not for the person at the terminal; errors reach them as NetqError.
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("node.link").setLevel(logging.CRITICAL)
    try:
        return asyncio.run(coro())  # type: ignore[arg-type]
    except NetqError as exc:
        # Escaped: messages name settings in brackets ("blocked by [gcode]"), which rich takes for markup.
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


async def _client(config: Path | None, broker: str | None) -> Any:
    """Connect to the farm: --broker, else the config's broker.url, else the local node's broker, else zeroconf."""
    from broker.discover import discover_broker
    from broker.host import parse_broker_url
    from node.app.client import FarmClient
    from node.app.config import load_settings
    from shared import security

    settings = load_settings(config) if config is not None or os.environ.get("NETQ_CONFIG") else None
    base = settings.farm.base_topic if settings else "netq"
    address = None
    if broker:
        address = parse_broker_url(broker)
    elif settings is not None and settings.broker.url:
        address = parse_broker_url(settings.broker.url)
    elif settings is not None:
        try:
            rt = json.loads((settings.data_dir / "runtime.json").read_text())
            if rt.get("broker"):
                address = (str(rt["broker"][0]), int(rt["broker"][1]))
        except (OSError, ValueError):
            pass
    # The operator's broker credential, from the farm key of the config (or NETQ_FARM__KEY): none if open.
    key = (settings if settings is not None else load_settings(None)).farm.key_bytes
    if address is None:
        interfaces = settings.broker.interfaces if settings is not None else None
        address = await discover_broker(interfaces or None, farm=None if key is None else security.farm_id(key))
    operator = security.Role.OPERATOR
    # With the key, answers and retained state are checked against the farm's state key: a forged one is ignored.
    client = FarmClient(address, base_topic=base, username=None if key is None else operator.value,
                        password=None if key is None else security.broker_password(key, operator),
                        state_key=None if key is None else security.state_public_key(key))
    await client.connect()
    return client


# --- the node agent ---------------------------------------------------------------------------------------
@app.command()
def run(
    config: ConfigOpt = None,
    node_id: Annotated[str | None, typer.Option("--node-id", help="This node's id (default: host name).")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="Where the replica and files live.")] = None,
    broker: BrokerOpt = None,
    witness: Annotated[bool, typer.Option("--witness", help="A printer-less member that only votes.")] = False,
    interface: Annotated[list[str] | None, typer.Option("--interface", help="Zeroconf interface address "
                                                        "(repeat for several).")] = None,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True)] = 0,
) -> None:
    """Run the node agent of this printer host (see deploy/netq.toml.example)."""
    from node.app.agent import NodeAgent
    from node.app.config import load_settings

    logging.basicConfig(level=logging.DEBUG if verbose > 0 else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbose < 2:  # the libraries are chatty: their debug output only with -vv
        for name in ("amqtt", "transitions", "aiohttp", "zeroconf", "node.link.mqtt.paho", "asyncio"):
            logging.getLogger(name).setLevel(logging.WARNING)
    flags: dict[str, Any] = {"node_id": node_id, "data_dir": str(data_dir) if data_dir else None,
                             "broker.url": broker, "broker.interfaces": interface}
    if witness:
        flags["witness"] = True

    async def main() -> None:
        settings = load_settings(config, flags)
        if settings.witness:
            err.print("running as a witness: this node votes in elections and holds a replica, but prints nothing")
        agent = NodeAgent(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await agent.start()
        try:
            await stop.wait()
        finally:
            await agent.stop()

    _run(main)


# --- the farm's identity: init, pair, join (docs/security.md, "Pairing a node") -----------------------------
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="The node's data directory (default: the "
                                                  "config's data_dir, else ~/.local/share/netqueues).")]


def _identity(config: Path | None, data_dir: Path | None) -> Any:
    """The local node's settings for init/pair/join, and the farm key in its key file (or None)."""
    from node.app.config import load_settings, read_key_file

    settings = load_settings(config, {"data_dir": str(data_dir) if data_dir else None})
    return settings, read_key_file(settings.data_dir)


def _own_key_file(settings: Any, held: str | None) -> None:
    """Refuse when the key that counts is not the key file's: writing the file would change nothing."""
    from shared.errors import ConfigError

    if settings.farm.open:
        raise ConfigError("this node is configured with farm.open = true: remove that first (a farm with a key "
                          "is not open)")
    if settings.farm.key is not None and settings.farm.key != held:
        raise ConfigError("this node's farm key is set in its config file or environment (farm.key), which wins "
                          "over the key file: change it there")


@app.command("init")
def init_farm(
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace this node's farm key (a new farm, or a key "
                                        "rotation: every other node then pairs again).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print {farm_id, key, pairing_code} as the last line.")]
    = False,
) -> None:
    """Make a new farm: a farm key, its farm id, and a pairing code for the next host (`netq join CODE`)."""
    import time

    from rich.markup import escape

    from node.app.config import write_key_file
    from node.app.pairing import issue_code
    from shared import pairing, security
    from shared.errors import ConfigError

    async def main() -> dict[str, Any]:
        settings, held = _identity(config, data_dir)
        _own_key_file(settings, held)
        if held is not None and not force:
            raise ConfigError(f"this node already holds the key of farm {settings.farm.farm_id} "
                              f"({settings.data_dir / 'farm.key'}): `netq init --force` replaces it (a new farm, "
                              "or a key rotation), and then every other node must pair again")
        key = security.new_farm_key()
        out: dict[str, Any] = {"farm_id": security.farm_id(security.parse_key(key)), "key": key}
        code, out["key_file"], out["expires"] = pairing.new_code(), None, None
        try:
            out["key_file"] = str(write_key_file(settings.data_dir, key, replace=True))
            code, pending = issue_code(settings.data_dir)
            out["expires"] = pending.expires
        except ConfigError as exc:  # nowhere to keep it: the key is still good to paste into [farm] key
            kept = ("the pairing code is not served" if out["key_file"]
                    else "nothing was kept: paste the key into \\[farm] key")
            err.print(f"[yellow]warning:[/yellow] {escape(str(exc))}; {kept}", highlight=False, soft_wrap=True)
        out["pairing_code"] = str(code)
        return out

    data = _run(main)
    if as_json:
        print(json.dumps({k: data[k] for k in ("farm_id", "key", "pairing_code")}))
        return
    until = time.strftime("%H:%M", time.localtime(data["expires"])) if data["expires"] else None
    console.print(f"A new farm: [bold]{data['farm_id']}[/bold] (its public id)", highlight=False, soft_wrap=True)
    kept = f"; kept in {data['key_file']} (mode 0600)" if data["key_file"] else ""
    console.print(f"  farm key      {data['key']}\n                secret: whoever holds it is a member{kept}",
                  highlight=False, soft_wrap=True)
    if until:
        console.print(f"  pairing code  [bold]{data['pairing_code']}[/bold]\n"
                      f"                for the next host: one try, until {until}, served while this node runs",
                      highlight=False, soft_wrap=True)
    console.print("Next:\n"
                  "  1. start this node:   netq run" + (f" --config {config}" if config else "")
                  + (f" --data-dir {data_dir}" if data_dir else "") + "\n"
                  f"  2. on the next host:  netq join {data['pairing_code']}\n"
                  "     (or paste the key into its config: \\[farm] key = \"…\")\n"
                  "  3. for each further host, `netq pair` on any member prints a new code",
                  highlight=False, soft_wrap=True)


@app.command("pair")
def pair_code(
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    minutes: Annotated[float, typer.Option("--minutes", min=1, max=24 * 60, help="How long the code is "
                                           "served.")] = 15,
    as_json: JsonOpt = False,
) -> None:
    """Issue a fresh pairing code on this member, for the next host's `netq join CODE` (one try; it replaces
    any earlier code of this node)."""
    import time

    from node.app.pairing import issue_code
    from shared.errors import ConfigError

    async def main() -> dict[str, Any]:
        settings, _held = _identity(config, data_dir)
        if settings.farm.key is None:
            raise ConfigError("this node holds no farm key, so it has none to share: `netq init` makes a farm, "
                              "`netq join CODE` joins one")
        code, pending = issue_code(settings.data_dir, ttl_s=minutes * 60)
        address = None
        try:
            rt = json.loads((settings.data_dir / "runtime.json").read_text())
            os.kill(int(rt["pid"]), 0)
            address = rt.get("pair_address")
        except (OSError, ValueError, KeyError, TypeError):
            err.print("[yellow]note:[/yellow] no node agent seems to run with this data directory: the code is "
                      "served once it runs (`netq run`)", highlight=False, soft_wrap=True)
        return {"pairing_code": str(code), "expires": pending.expires, "address": address,
                "farm_id": settings.farm.farm_id}

    data = _run(main)
    if as_json:
        print(json.dumps(data))
        return
    until = time.strftime("%H:%M", time.localtime(data["expires"]))
    console.print(f"pairing code for farm {data['farm_id']}: [bold]{data['pairing_code']}[/bold] "
                  f"(one try, until {until})", highlight=False, soft_wrap=True)
    console.print(f"on the new host:  netq join {data['pairing_code']}"
                  + (f"\n   or directly:   netq join {data['pairing_code']} --address {data['address']}"
                     if data["address"] else ""), highlight=False, soft_wrap=True)



async def _join_found(code: Any, interfaces: list[str] | None, timeout: float) -> Any:
    """Pair with the member zeroconf finds that holds ``code``: other farms' members on the same network answer
    that they have no such code (which uses nothing up), so those found are asked as they are found, until one
    has it or ``timeout`` is over."""
    from node.app.pairing import NoMemberHasCode, discover_members
    from node.app.pairing import join as pair_with

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    tried: set[str] = set()
    while True:
        left = deadline - loop.time()
        urls = [u for u in await discover_members(interfaces, timeout=max(left, 0.5)) if u not in tried]
        if urls:
            try:
                return await pair_with(code, urls, timeout=timeout)
            except NoMemberHasCode:
                tried.update(urls)
                if loop.time() < deadline:
                    continue
                raise
        if loop.time() >= deadline:
            raise NetqError("no member of this farm found on the network"
                            + (f" (zeroconf on {', '.join(interfaces)})" if interfaces else "")
                            + (f"; {len(tried)} member(s) of other farms asked" if tried else "")
                            + ": is a member running? give --address HOST:PORT (`netq pair` prints it)")

@app.command("join")
def join_farm(
    code: Annotated[str, typer.Argument(help="The pairing code from `netq init` or `netq pair`, e.g. "
                                        "42-maple-otter-violin.")],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    address: Annotated[list[str] | None, typer.Option("--address", help="HOST:PORT of a member's pairing "
                                                      "endpoint (`netq pair` prints it); default: zeroconf.")]
    = None,
    interface: Annotated[list[str] | None, typer.Option("--interface", help="Zeroconf interface address (default: "
                                                        "broker.interfaces, else all).")] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to look for members, and per member.")]
    = 5.0,
    force: Annotated[bool, typer.Option("--force", help="Replace a farm key this node already holds.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Join a farm: fetch its key from a member with a pairing code (SPAKE2: the code never travels), keep it
    in the node's data directory."""
    from node.app.config import write_key_file
    from node.app.pairing import join as pair_with
    from shared.errors import ConfigError
    from shared.pairing import parse_code

    async def main() -> dict[str, Any]:
        parsed = parse_code(code)
        settings, held = _identity(config, data_dir)
        _own_key_file(settings, held)
        if held is not None and not force:
            raise ConfigError(f"this node already holds the key of farm {settings.farm.farm_id}: `--force` "
                              "replaces it (this node then leaves that farm)")
        if address:
            urls = [a if a.startswith("http://") else f"http://{a}" for a in address]
            joined = await pair_with(parsed, urls, timeout=timeout)
        else:
            joined = await _join_found(parsed, list(interface or settings.broker.interfaces) or None, timeout)
        path = write_key_file(settings.data_dir, joined.key, replace=True)
        return {"farm_id": joined.farm_id, "member": joined.member, "key_file": str(path)}

    data = _run(main)
    if as_json:
        print(json.dumps(data))
        return
    console.print(f"joined farm [bold]{data['farm_id']}[/bold]: the key came from {data['member']}, kept in "
                  f"{data['key_file']}\nnext: netq run" + (f" --config {config}" if config else "")
                  + (f" --data-dir {data_dir}" if data_dir else ""), highlight=False, soft_wrap=True, markup=True)


# --- queue commands ---------------------------------------------------------------------------------------
def _parse_material(text: str) -> dict[str, Any] | None:
    if text in ("", "-", "any"):
        return None
    mtype, _, color = text.partition(":")
    return {"type": mtype, "color": color or None}


@app.command()
def add(
    files: Annotated[list[Path], typer.Argument(help="G-code files (one set each) or one .gjob archive.",
                                                exists=True, dir_okay=False)],
    namespace: Annotated[str, typer.Option("--namespace", "-n")] = "default",
    count: Annotated[int, typer.Option("--count", help="Copies of the whole job.")] = 1,
    set_count: Annotated[int, typer.Option("--set-count", help="Times each file is printed per copy.")] = 1,
    priority: Annotated[int, typer.Option("--priority")] = 0,
    name: Annotated[str | None, typer.Option("--name")] = None,
    material: Annotated[list[str] | None, typer.Option(
        "--material", help="Material per tool, TYPE[:COLOR], repeat per tool (e.g. PLA:red).")] = None,
    profile: Annotated[list[str] | None, typer.Option("--profile", help="Printer profile allowed "
                                                       "(repeat; default any).")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="Printer tag required (repeat).")] = None,
    config: ConfigOpt = None,
    broker: BrokerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload files through a node and queue them as one job.

    What each file needs (printer profile, nozzle, material types, extents, duration) is read from its slicer
    header where no option gives it. One ``.gjob`` archive (Continuous Print's format) queues its job with its
    sets, counts, materials and profiles; --count, --name, --material and --profile override the archive's.
    """
    from node.files.job_sets import beds_known, fill_set, read_file_meta
    from node.files.upload import upload_file

    count_given = count != 1
    gjob = len(files) == 1 and files[0].suffix.lower() == ".gjob"
    if not gjob and any(f.suffix.lower() == ".gjob" for f in files):
        err.print("[red]error:[/red] give one .gjob archive on its own, or G-code files")
        raise typer.Exit(2)

    async def main() -> dict[str, Any]:
        await asyncio.to_thread(_policy_precheck, files, gjob, config, profile)  # nothing uploaded if it fails
        client = await _client(config, broker)
        try:
            target = await _upload_target(client, config)
            token = _file_token(config)
            extents = beds_known((await client.request("node/list"))["nodes"])
            given: dict[str, Any] = {}
            if material:
                given["materials"] = [_parse_material(m) for m in material]
            if profile:
                given["profiles"] = list(profile)
            if gjob:
                body = await _gjob_job(files[0], target, given, show_progress=not as_json, extents=extents,
                                       token=token)
                if count_given:
                    body["count"] = count
            else:
                sets = []
                for path in files:
                    meta = await asyncio.to_thread(read_file_meta, path)
                    sha = await upload_file(target[1], path, show_progress=not as_json, token=token)
                    sets.append(fill_set({"file": path.name, "sha256": sha, "count": set_count,
                                          "holders": [target[0]], **given}, meta, extents=extents))
                body = {"count": count, "sets": sets}
            body.update({"namespace": namespace, "priority": priority, "tags": list(tag or [])})
            if name:
                body["name"] = name
            return dict(await client.request("job/add", body))
        finally:
            await client.close()

    data = _run(main)
    if as_json:
        print(json.dumps(data))
    else:
        console.print(f"queued job [bold]{data['id']}[/bold] in [bold]{data['namespace']}[/bold] "
                      f"({data['copies']} {'copy' if data['copies'] == 1 else 'copies'})")


def _policy_precheck(files: list[Path], gjob: bool, config: Path | None, profiles: list[str] | None) -> None:
    """``netq add``'s check before anything is uploaded: the G-code policy of the local config's ``[gcode]``
    (the defaults without a config), under the caps of ``--profile`` (else the farm's highest). The node that
    takes the upload and the arbiter check again. Raises PolicyError or ArchiveError naming file, line and rule."""
    from node.app.config import load_settings
    from node.files.analysis import check_path
    from shared.gcode_policy import PolicyError, summary
    from shared.gjob import read_gjob

    gcode = load_settings(config).gcode
    policy = gcode.policy(gcode.set_caps(profiles) if profiles else None)
    if gjob:
        read_gjob(files[0], policy=policy)
        return
    for path in files:
        violations = check_path(path, policy)
        if violations:
            raise PolicyError(f"{path.name} breaks the G-code policy, not uploaded: {summary(violations)}",
                              violations)


async def _gjob_job(archive: Path, target: tuple[str, str], given: dict[str, Any], *,
                    show_progress: bool, extents: bool, token: str | None = None) -> dict[str, Any]:
    """Check a ``.gjob``, upload each of its files through ``target``, and return the ``job/add`` body."""
    import tempfile

    from node.files.job_sets import job_from_manifest, read_file_meta
    from node.files.upload import upload_file
    from shared.gjob import read_gjob

    manifest, entries = await asyncio.to_thread(read_gjob, archive)
    shas, metas = {}, {}
    with tempfile.TemporaryDirectory(prefix="netq-gjob-") as tmp:
        for i, (path, entry) in enumerate(entries.items()):
            local = Path(tmp) / str(i) / Path(path).name  # the archive's names never choose where we write
            local.parent.mkdir()

            def unpack(entry: Any = entry, local: Path = local) -> None:
                with local.open("wb") as fh:
                    for chunk in entry.iter_chunks():
                        fh.write(chunk)

            await asyncio.to_thread(unpack)
            metas[path] = await asyncio.to_thread(read_file_meta, local)
            shas[path] = await upload_file(target[1], local, show_progress=show_progress, token=token)
    body = job_from_manifest(manifest, shas, target[0], metas, extents=extents)
    for s in body["sets"]:
        s.update(given)
    return body


def _file_token(config: Path | None) -> str | None:
    """The operator's file token, from the farm key of --config (or NETQ_CONFIG, or NETQ_FARM__KEY)."""
    from node.app.config import load_settings
    from shared import security

    key = load_settings(config).farm.key_bytes
    return None if key is None else security.file_token(key, security.Role.OPERATOR)


async def _upload_target(client: Any, config: Path | None) -> tuple[str, str]:
    """(node id, files URL) of the node to upload through: the local node, else any online node."""
    from node.app.config import load_settings

    if config is not None or os.environ.get("NETQ_CONFIG"):
        settings = load_settings(config)
        try:
            rt = json.loads((settings.data_dir / "runtime.json").read_text())
            return str(rt["node_id"]), str(rt["files_url"])
        except (OSError, ValueError, KeyError):
            pass
    states = await _node_states(client)
    online = [s for s in states.values() if s.get("state") == "online" and s.get("files_url")]
    if not online:
        raise NetqError("no online node to upload the file to")
    online.sort(key=lambda s: (not s.get("arbiter"), s["node_id"]))
    return str(online[0]["node_id"]), str(online[0]["files_url"])


async def _node_states(client: Any, settle: float = 0.5) -> dict[str, dict[str, Any]]:
    client.watch(client.topics.node_state_filter)
    await asyncio.sleep(settle)  # retained messages arrive right after subscribing; there is no end marker
    return dict(client.node_states())


@app.command("export")
def export(
    job_id: Annotated[str, typer.Argument(help="Id of the job to export.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The .gjob file to write.", dir_okay=False)],
    namespace: Annotated[str, typer.Option("--namespace", "-n")] = "default",
    config: ConfigOpt = None,
    broker: BrokerOpt = None,
) -> None:
    """Write a queued job as a .gjob archive (Continuous Print's format), its files fetched from a holder."""
    import tempfile

    from node.files.archive import export_gjob
    from node.files.fetch import fetch
    from node.files.job_sets import manifest_from_job
    from node.files.store import FileStore

    async def main() -> int:
        client = await _client(config, broker)
        try:
            listing = await client.request("queue/list", {"namespace": namespace, "include_done": True})
            job = next((j for j in listing["jobs"] if j["id"] == job_id), None)
            if job is None:
                raise NetqError(f"no job {job_id!r} in {namespace!r}")
            nodes = {n["node_id"]: n for n in (await client.request("node/list"))["nodes"]}
        finally:
            await client.close()
        manifest, paths = manifest_from_job(job)
        with tempfile.TemporaryDirectory(prefix="netq-export-") as tmp:
            store = FileStore(Path(tmp))
            for s in job["sets"]:
                if store.has(s["sha256"]):
                    continue
                urls = [nodes[h]["files_url"] for h in s.get("holders", [])
                        if nodes.get(h, {}).get("state") == "online" and nodes[h].get("files_url")]
                if not urls:
                    raise NetqError(f"no online holder of {s['file']} ({', '.join(s.get('holders', []))})")
                await fetch(s["sha256"], urls, store, token=_file_token(config))  # hash-verified
            data = await export_gjob(manifest, store, paths)
        tmp_out = output.with_name(output.name + ".part")
        tmp_out.write_bytes(data)
        tmp_out.replace(output)
        return len(data)

    size = _run(main)
    console.print(f"wrote {output} ({size} bytes)")


@app.command("bed-cleared")
def bed_cleared(
    node: Annotated[str | None, typer.Argument(help="The node whose bed is clear (default: the local node).")] = None,
    config: ConfigOpt = None,
    broker: BrokerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Tell a node waiting for its bed to be cleared that it is: it takes its next print."""
    from node.app.config import load_settings

    if node is None:
        if config is None and not os.environ.get("NETQ_CONFIG"):
            err.print("[red]error:[/red] name the node, or give --config of the local node")
            raise typer.Exit(2)
        node = load_settings(config).node_id
    _simple("node/bed_cleared", {"node": node}, config, broker, as_json,
            lambda d: f"{d.get('node', node)}: bed cleared ({d.get('worker', '?')})")


@app.command()
def jobs(
    namespace: Annotated[str | None, typer.Option("--namespace", "-n")] = None,
    active: Annotated[bool, typer.Option("--active", help="Hide finished jobs.")] = False,
    config: ConfigOpt = None,
    broker: BrokerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the queues: each job, its copies and who prints them."""

    async def main() -> dict[str, Any]:
        client = await _client(config, broker)
        try:
            body: dict[str, Any] = {"include_done": not active}
            if namespace:
                body["namespace"] = namespace
            return dict(await client.request("queue/list", body))
        finally:
            await client.close()

    data = _run(main)
    if as_json:
        print(json.dumps(data))
        return
    table = Table(title="netqueues jobs")
    for col in ("queue", "job", "name", "state", "copies", "priority", "printing on", "notes"):
        # Job ids are what people copy into other commands: never cut them short.
        table.add_column(col, no_wrap=col == "job", min_width=12 if col == "job" else None)
    for job in data["jobs"]:
        copies = job["copies"]
        done = sum(1 for c in copies if c["state"] == "done")
        nodes = sorted({c["node"] for c in copies if c["state"] in ("claimed", "printing", "orphaned") and c["node"]})
        notes = [c["reason"] for c in copies if c.get("reason") and c["state"] != "done"]
        if any(c.get("conflict") for c in copies):
            notes.insert(0, "CONFLICT: printed twice")
        paused = data.get("queues", {}).get(job["namespace"], {}).get("paused")
        table.add_row(job["namespace"] + (" (paused)" if paused else ""), job["id"], job["name"], job["state"],
                      f"{done}/{len(copies)}", str(job["priority"]), ", ".join(nodes), "; ".join(notes[:2]))
    console.print(table)


@app.command()
def nodes(config: ConfigOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False) -> None:
    """List the farm's nodes: roles, printer state, current job."""

    async def main() -> dict[str, Any]:
        client = await _client(config, broker)
        try:
            return dict(await client.request("node/list"))
        finally:
            await client.close()

    data = _run(main)
    if as_json:
        print(json.dumps(data))
        return
    table = Table(title=f"farm {data.get('farm_id') or data.get('farm')} — arbiter {data.get('arbiter')} (term {data.get('term')}), "
                        f"safety {data.get('safety')}")
    for col in ("node", "online", "role", "worker", "job", "progress", "note"):
        table.add_column(col)
    for n in data["nodes"]:
        roles = [r for r, on in (("arbiter", n.get("arbiter")), ("broker", n.get("broker_host")),
                                 ("witness", n.get("witness"))) if on]
        if n.get("retired"):
            roles.append("retired")
        elif not n.get("enrolled"):
            roles.append("not enrolled")
        progress = f"{n['progress'] * 100:.0f}%" if n.get("progress") is not None else ""
        job = f"{n['job']}#{n['copy_index']}" if n.get("job") else ""
        table.add_row(n["node_id"], n.get("state", "?"), ", ".join(roles), str(n.get("worker", "")), job, progress,
                      n.get("reason") or "")
    console.print(table)
    if data.get("warning"):
        err.print(f"[yellow]warning:[/yellow] {data['warning']}")


def _simple(path: str, body: dict[str, Any], config: Path | None, broker: str | None, as_json: bool,
            say: Callable[[dict[str, Any]], str]) -> None:
    async def main() -> dict[str, Any]:
        client = await _client(config, broker)
        try:
            return dict(await client.request(path, body))
        finally:
            await client.close()

    data = _run(main)
    print(json.dumps(data) if as_json else say(data))


def _given(**options: Any) -> dict[str, Any]:
    """The options the user gave (not None), as request fields."""
    return {k: v for k, v in options.items() if v is not None}


@job_app.command("remove")
def job_remove(job_id: str, namespace: Annotated[str, typer.Option("--namespace", "-n")] = "default",
               config: ConfigOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False) -> None:
    """Remove a job (its queued copies are cancelled)."""
    _simple("job/remove", {"namespace": namespace, "id": job_id}, config, broker, as_json,
            lambda d: f"removed {d['id']}")


@job_app.command("update")
def job_update(job_id: str, namespace: Annotated[str, typer.Option("--namespace", "-n")] = "default",
               count: Annotated[int | None, typer.Option("--count")] = None,
               priority: Annotated[int | None, typer.Option("--priority")] = None,
               name: Annotated[str | None, typer.Option("--name")] = None,
               config: ConfigOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False) -> None:
    """Change a job's copies, priority or name."""
    body = {"namespace": namespace, "id": job_id, **_given(count=count, priority=priority, name=name)}
    _simple("job/update", body, config, broker, as_json, lambda d: f"updated {d['id']}")


@job_app.command("move")
def job_move(job_id: str, namespace: Annotated[str, typer.Option("--namespace", "-n")] = "default",
             before: Annotated[str | None, typer.Option("--before")] = None,
             after: Annotated[str | None, typer.Option("--after")] = None,
             position: Annotated[int | None, typer.Option("--position", help="0 = top")] = None,
             config: ConfigOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False) -> None:
    """Move a job within its queue."""
    body = {"namespace": namespace, "id": job_id, **_given(before=before, after=after, position=position)}
    _simple("job/move", body, config, broker, as_json, lambda d: f"moved {d['id']} to position {d['position']}")


@job_app.command("resolve")
def job_resolve(job_id: str, copy: int,
                outcome: Annotated[str, typer.Option("--outcome", help="requeue, done or failed")],
                namespace: Annotated[str, typer.Option("--namespace", "-n")] = "default",
                config: ConfigOpt = None, broker: BrokerOpt = None, as_json: JsonOpt = False) -> None:
    """Settle an orphaned, failed or conflicting copy after checking the printer."""
    _simple("job/resolve", {"namespace": namespace, "id": job_id, "copy": copy, "outcome": outcome}, config,
            broker, as_json, lambda d: f"copy {copy} of {job_id}: {outcome}")


@node_app.command("retire")
def node_retire(
    node_id: Annotated[str, typer.Argument(help="The member to retire.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    config: ConfigOpt = None,
    broker: BrokerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Retire a member for good: it stops counting in quorums and is never enrolled again under this id.

    A copy it claimed but has not started goes back to the queue; a copy it is printing becomes orphaned, for
    `netq job resolve`. The arbiter itself, the last printer, and a change that would leave the farm without a
    reachable quorum are refused.
    """
    if not yes and not typer.confirm(f"Retire {node_id} from the farm for good?"):
        raise typer.Exit(1)

    def say(d: dict[str, Any]) -> str:
        lines = [f"retired {d['node']}; members now: {', '.join(d['members'])}"]
        for what, kind in (("back in the queue", "released"), ("orphaned (see `netq job resolve`)", "orphaned")):
            lines += [f"  {c['namespace']}/{c['job']} copy {c['copy']}: {what}" for c in d.get(kind, [])]
        return "\n".join(lines)

    _simple("node/retire", {"node": node_id}, config, broker, as_json, say)


# --- credentials ------------------------------------------------------------------------------------------
CREDENTIAL_ROLES = ("homeassistant", "operator", "viewer", "node")


@app.command()
def credentials(
    role: Annotated[str, typer.Argument(help="homeassistant, operator, viewer or node; or mosquitto, to write a "
                                        "password file and an ACL file for an external mosquitto.")],
    password_only: Annotated[bool, typer.Option("--password", help="Print only the password (for scripts: "
                                                "mosquitto_pub -u operator -P \"$(netq credentials operator "
                                                "--password)\" …).")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="mosquitto: the folder to write the files into.",
                                             file_okay=False)] = None,
    listen: Annotated[str, typer.Option("--listen", help="mosquitto: HOST:PORT of the listener in the "
                                        "mosquitto.conf snippet.")] = "0.0.0.0:1883",
    config: ConfigOpt = None,
    broker: BrokerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A role's broker credentials, file token and the farm's state public key, from the farm key (e.g. what to
    paste into Home Assistant's MQTT integration); or, with ``mosquitto``, the files an external broker needs."""
    from node.app.config import load_settings
    from shared import security

    if role not in (*CREDENTIAL_ROLES, "mosquitto"):
        err.print(f"[red]error:[/red] ROLE is one of {', '.join(CREDENTIAL_ROLES)} or mosquitto", highlight=False)
        raise typer.Exit(2)
    try:
        settings = load_settings(config)
        key = settings.farm.key_bytes
        if key is None:
            raise NetqError("this farm has no key (an open farm, or not set up yet), so it has no credentials: "
                            "`netq init` makes a farm key, `netq join CODE` fetches one")
        if role == "mosquitto":
            _mosquitto_files(settings, key, out, listen, as_json)
            return
        info = _credentials(settings, key, security.Role(role), broker)
    except NetqError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    if password_only:
        print(info["password"])
    elif as_json:
        print(json.dumps(info))
    else:
        _say_credentials(info)


def _credentials(settings: Any, key: bytes, role: Any, broker: str | None) -> dict[str, Any]:
    """What a client of ``role`` needs, as printed by ``netq credentials ROLE --json``."""
    from broker.host import parse_broker_url
    from node.files.http import may
    from shared import security

    address: tuple[str, int] | None = None
    if broker or settings.broker.url:
        address = parse_broker_url(broker or settings.broker.url)
    else:  # the broker this node uses now (an embedded broker moves when its host stops)
        try:
            rt = json.loads((settings.data_dir / "runtime.json").read_text())
            if rt.get("broker"):
                address = (str(rt["broker"][0]), int(rt["broker"][1]))
        except (OSError, ValueError, TypeError, IndexError):
            pass
    info: dict[str, Any] = {
        "farm_id": security.farm_id(key), "role": role.value,
        "broker": None if address is None else {"host": address[0], "port": address[1]},
        "username": role.value, "password": security.broker_password(key, role),
        "base_topic": settings.farm.base_topic, "state_public_key": security.state_public_key(key),
    }
    if may(role, "GET") or may(role, "POST"):
        info["file_token"] = security.file_token(key, role)
    if role is security.Role.HOMEASSISTANT:
        info["discovery_prefix"] = settings.homeassistant.prefix
    return info


def _say_credentials(info: dict[str, Any]) -> None:
    broker = info["broker"]
    host = broker["host"] if broker else "the broker host's address (`netq nodes`: the node with role broker)"
    port = str(broker["port"]) if broker else "1883 (the broker.port of the nodes)"
    if info["role"] == "homeassistant":
        print("Home Assistant: Settings → Devices & services → Add integration → MQTT, then")
    rows = [("Broker", host), ("Port", port), ("Username", info["username"]), ("Password", info["password"])]
    if "discovery_prefix" in info:
        rows.append(("Discovery prefix", f"{info['discovery_prefix']} (the MQTT integration's options)"))
    if "file_token" in info:
        rows.append(("File token", f"{info['file_token']} (Authorization: Bearer, on the nodes' file servers)"))
    rows.append(("Farm", info["farm_id"]))
    rows.append(("State key", f"{info['state_public_key']} (checks the farm's signed state and answers)"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name.ljust(width)}  {value}")


def _mosquitto_files(settings: Any, key: bytes, out: Path | None, listen: str, as_json: bool) -> None:
    from broker.auth import TopicPolicy, write_mosquitto_files

    if out is None:
        raise NetqError("netq credentials mosquitto needs --out DIR: the folder to write the files into")
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise NetqError(f"--listen {listen!r}: expected HOST:PORT, e.g. 0.0.0.0:1883")
    policy = TopicPolicy(settings.farm.base_topic, settings.homeassistant.prefix)
    paths = write_mosquitto_files(out.resolve(), key, policy, host=host, port=int(port_text))
    if as_json:
        print(json.dumps({k: str(v) for k, v in paths.items()}))
        return
    print(f"wrote {paths['password_file']} (the four role passwords, hashed) and {paths['acl_file']} (their topic "
          "rules)\nadd to mosquitto.conf (or `include_dir` the folder):\n")
    print(paths["conf"].read_text(), end="")
    print("\nmosquitto cannot refuse retained publishes by ACL: see docs/security.md.")


@app.command()
def demo(
    nodes_: Annotated[int, typer.Option("--nodes", help="Node agents to start.")] = 3,
    jobs_: Annotated[int, typer.Option("--jobs", help="Jobs to queue.")] = 12,
    until_done: Annotated[bool, typer.Option("--until-done", help="Exit when every copy is printed.")] = False,
    kill_host: Annotated[bool, typer.Option("--kill-host", help="kill -9 the broker host and arbiter "
                                            "midway, to watch the farm recover.")] = False,
    time_scale: Annotated[float, typer.Option("--time-scale", help="Simulated seconds per real second.")] = 120,
    timeout: Annotated[float, typer.Option("--timeout", help="Give up after this many seconds.")] = 300,
    as_json: JsonOpt = False,
) -> None:
    """Run a small farm on this machine (broker and zeroconf on 127.0.0.1, simulated printers) and show it."""
    from node.demo.run import run_demo

    result = _run(lambda: run_demo(nodes_, jobs_, until_done=until_done, kill_host=kill_host,
                                   time_scale=time_scale, timeout=timeout, as_json=as_json))
    if as_json:
        print(json.dumps(result))
    if result.get("lost") or result.get("double_starts") or (until_done and result.get("unfinished")):
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
