"""A printer behind OctoPrint, driven through octorest 0.4.

octorest is synchronous and has no timeouts, so every call runs in this driver's own worker threads, over a
:class:`requests.Session` that gives every request a timeout and turns a non-2xx reply into
:class:`OctoPrintHttpError` (octorest itself would raise a bare ``RuntimeError`` without the status code).
Foreign errors become :class:`~shared.errors.PrinterError` (or :class:`~shared.errors.PrinterOffline` when
OctoPrint cannot be reached) in exactly one place, :func:`_translate`.

OctoPrint reports a state text; :func:`interpret` maps it to a :class:`PrinterState` and :class:`_Tracker`
works out how each print ended ("done", "cancelled", "failed") from the transitions that :meth:`status`
observes, since OctoPrint's REST API keeps no history of outcomes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import requests
from octorest import OctoRest  # type: ignore[import-untyped]

from node.worker.printers.base import PrinterState, PrinterStatus
from shared.errors import PrinterError, PrinterOffline

log = logging.getLogger(__name__)

T = TypeVar("T")

# OctoPrint's state texts (octoprint/util/comm.py, MachineCom.getStateString).
READY_TEXTS = frozenset({"Operational"})
PAUSED_TEXTS = frozenset({"Paused"})
ACTIVE_TEXTS = frozenset(
    {
        "Starting",
        "Printing",
        "Pausing",
        "Paused",
        "Resuming",
        "Finishing",
        "Cancelling",
        "Starting print from SD",
        "Printing from SD",
        "Starting to send file to SD",
        "Sending file to SD",
        "Transferring file to SD",
    }
)
STARTING_TEXTS = frozenset({"Starting", "Starting print from SD", "Starting to send file to SD"})
CONNECTING_TEXTS = frozenset({"Opening serial connection", "Detecting serial connection", "Connecting"})
CLOSED_TEXTS = frozenset({"Offline", "Closed"})
ERROR_TEXTS = frozenset({"Error", "Offline after error"})

GCODE_SUFFIXES = (".gcode", ".gco", ".g")
_MAX_REMEMBERED_NAMES = 32


class OctoPrintHttpError(requests.HTTPError):
    """A non-2xx reply, with OctoPrint's own description of the problem."""

    def __init__(self, response: requests.Response) -> None:
        self.status = response.status_code
        self.description = _describe(response)
        super().__init__(f"{self.status} {response.reason}: {self.description}", response=response)


def _describe(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])
    return response.text.strip()[:200] or response.reason or "no description"


class _OctoPrintSession(requests.Session):
    """A session with a default timeout on every request; non-2xx replies raise :class:`OctoPrintHttpError`."""

    def __init__(self, api_key: str, timeout: float) -> None:
        super().__init__()
        self.default_timeout = timeout
        self.headers["X-Api-Key"] = api_key

    def request(self, method: str, url: Any, *args: Any, **kwargs: Any) -> requests.Response:
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.default_timeout
        response = super().request(method, url, *args, **kwargs)
        if not 200 <= response.status_code < 300:
            raise OctoPrintHttpError(response)
        return response


def _translate(exc: BaseException, op: str, url: str, conflict: str | None) -> PrinterError:
    """The one boundary where OctoPrint's and requests' errors become the project's own."""
    if isinstance(exc, OctoPrintHttpError):
        if exc.status in (401, 403):
            return PrinterError(f"OctoPrint at {url} refused the API key ({exc.status}) during {op}")
        if exc.status == 409 and conflict:
            return PrinterError(f"{conflict} (OctoPrint 409: {exc.description})")
        if exc.status in (502, 503, 504):
            return PrinterOffline(f"OctoPrint at {url} unavailable during {op}: {exc}")
        return PrinterError(f"OctoPrint refused {op}: {exc}")
    if isinstance(exc, requests.Timeout):
        return PrinterOffline(f"OctoPrint at {url} did not answer {op} in time")
    if isinstance(exc, requests.ConnectionError):
        return PrinterOffline(f"OctoPrint at {url} unreachable during {op}")
    if isinstance(exc, requests.RequestException | ValueError):  # includes a reply that is not JSON
        return PrinterError(f"bad exchange with OctoPrint at {url} during {op}: {exc}")
    if isinstance(exc, RuntimeError):  # octorest's own checks
        return PrinterError(f"octorest failed during {op}: {exc}")
    return PrinterError(f"unexpected failure during {op}: {exc!r}")


# --- pure core: what OctoPrint's replies mean ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Observation:
    """One reading of OctoPrint's job and printer state."""

    text: str
    state: PrinterState
    path: str | None = None
    display: str | None = None
    completion: float | None = None  # percent, as OctoPrint reports it
    reason: str | None = None
    bed_temp: float | None = None

    @property
    def active(self) -> bool:
        return self.text in ACTIVE_TEXTS


def interpret(job: dict[str, Any], temperature: dict[str, Any] | None = None) -> Observation:
    """Map a ``GET /api/job`` reply (and ``/api/printer``'s temperature part) to an :class:`Observation`."""
    text = str(job.get("state") or "Unknown")
    file = (job.get("job") or {}).get("file") or {}
    completion = (job.get("progress") or {}).get("completion")
    bed = (temperature or {}).get("bed") or {}
    bed_temp = bed.get("actual")
    if text in READY_TEXTS:
        state, reason = PrinterState.READY, None
    elif text in PAUSED_TEXTS:
        state, reason = PrinterState.PAUSED, None
    elif text in ACTIVE_TEXTS:
        state, reason = PrinterState.PRINTING, None
    elif text in CLOSED_TEXTS:
        state, reason = PrinterState.OFFLINE, "printer not connected to OctoPrint"
    elif text in CONNECTING_TEXTS:
        state, reason = PrinterState.OFFLINE, f"OctoPrint is connecting to the printer ({text})"
    elif text in ERROR_TEXTS:
        state, reason = PrinterState.ERROR, f"{text}: {job.get('error') or 'no details from OctoPrint'}"
    else:
        state, reason = PrinterState.ERROR, f"unknown OctoPrint state {text!r}"
    return Observation(
        text=text,
        state=state,
        path=file.get("path"),
        display=file.get("display") or file.get("name"),
        completion=float(completion) if isinstance(completion, int | float) else None,
        reason=reason,
        bed_temp=float(bed_temp) if isinstance(bed_temp, int | float) else None,
    )


@dataclass
class _Tracker:
    """Works out how prints end from the sequence of observations (and the driver's own commands)."""

    active_path: str | None = None
    cancel_requested: bool = False
    saw_cancelling: bool = False
    last_result: str | None = None
    last_file: str | None = None
    names: dict[str, str] = field(default_factory=dict)  # OctoPrint path -> name given to start()

    def name_of(self, path: str | None, display: str | None = None) -> str | None:
        if path is None:
            return display
        return self.names.get(path, display or path)

    def started(self, path: str, name: str) -> None:
        self.names.pop(path, None)
        self.names[path] = name
        while len(self.names) > _MAX_REMEMBERED_NAMES:
            self.names.pop(next(iter(self.names)))
        self.active_path = path
        self.cancel_requested = self.saw_cancelling = False

    def observe(self, obs: Observation) -> None:
        if obs.active:
            if self.active_path is not None and obs.path != self.active_path:
                log.debug("print of %s ended unseen; now printing %s", self.active_path, obs.path)
                self.cancel_requested = self.saw_cancelling = False
            self.active_path = obs.path
            self.saw_cancelling |= obs.text == "Cancelling"
            return
        if self.active_path is None:
            return
        if obs.text in READY_TEXTS:
            if self.cancel_requested or self.saw_cancelling:
                result = "cancelled"
            elif obs.completion is not None and obs.completion >= 100.0 and obs.path == self.active_path:
                result = "done"
            else:
                # OctoPrint clears the progress on cancel; a Cancelling state can fall between two polls.
                result = "cancelled"
        else:  # error, or the printer connection closed under the print: the print is lost
            result = "failed"
        self.last_result, self.last_file = result, self.name_of(self.active_path)
        log.info("print of %s ended: %s (OctoPrint: %s)", self.last_file, result, obs.text)
        self.active_path = None
        self.cancel_requested = self.saw_cancelling = False

    def status(self, obs: Observation) -> PrinterStatus:
        busy = obs.state in (PrinterState.PRINTING, PrinterState.PAUSED)
        progress = None
        if busy and obs.completion is not None:
            progress = min(max(obs.completion / 100.0, 0.0), 1.0)
        return PrinterStatus(
            state=obs.state,
            file=self.name_of(obs.path, obs.display) if busy else None,
            progress=progress,
            reason=obs.reason,
            last_result=self.last_result,
            last_file=self.last_file,
            bed_temp=obs.bed_temp,
        )


def remote_name(name: str) -> str:
    """The file name to upload ``name`` under: no folders, and a suffix OctoPrint accepts as G-code."""
    base = PurePosixPath(name.replace("\\", "/")).name or "print"
    return base if base.lower().endswith(GCODE_SUFFIXES) else base + ".gcode"


# --- the shell: octorest in worker threads ----------------------------------------------------------------


class OctoPrintDriver:
    """A :class:`~node.worker.printers.base.PrinterDriver` for one printer connected to one OctoPrint."""

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        port: str = "VIRTUAL",
        baudrate: int | None = None,
        timeout: float = 10.0,
        connect_timeout: float = 30.0,
        poll_interval: float = 0.2,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise PrinterError(f"not an OctoPrint URL: {url!r}")
        self.url = f"{parts.scheme}://{parts.netloc}"  # octorest drops any path prefix
        self.port = port
        self.baudrate = baudrate
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.poll_interval = poll_interval
        self._session = _OctoPrintSession(api_key, timeout)
        self._client = OctoRest(url=self.url, session=self._session)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix=f"octoprint-{parts.netloc}"
        )
        self._pending: set[concurrent.futures.Future[Any]] = set()
        self._closed = False
        self._tracker = _Tracker()
        # Held while a status reading is taken and while a print is being selected and started, so that a
        # reading taken before a start is never interpreted after it.
        self._lock = asyncio.Lock()
        self._last_offline_reason: str | None = None

    def __repr__(self) -> str:
        return f"OctoPrintDriver({self.url!r}, port={self.port!r})"

    async def _call(self, op: str, fn: Callable[[OctoRest], T], *, conflict: str | None = None) -> T:
        """Run ``fn(client)`` in a worker thread; OctoPrint's errors come out as PrinterError."""
        if self._closed:
            raise PrinterError(f"{self!r} is closed")
        future = self._executor.submit(fn, self._client)
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        try:
            return await asyncio.wrap_future(future)
        except (requests.RequestException, RuntimeError, ValueError) as exc:
            raise _translate(exc, op, self.url, conflict) from exc

    async def _observe(self) -> Observation:
        def fetch(client: OctoRest) -> tuple[dict[str, Any], dict[str, Any] | None]:
            job = client.job_info()
            if not isinstance(job, dict):
                raise requests.exceptions.InvalidJSONError(f"GET /api/job answered {type(job).__name__}")
            temperature = None
            if job.get("state") not in CLOSED_TEXTS:
                try:
                    temperature = client.printer(exclude=["sd", "state"]).get("temperature")
                except OctoPrintHttpError as exc:
                    if exc.status != 409:  # 409: the printer went away between the two requests
                        raise
            return job, temperature

        async with self._lock:
            job, temperature = await self._call("status", fetch)
            obs = interpret(job, temperature)
            self._tracker.observe(obs)
            return obs

    async def connect(self) -> None:
        """Connect OctoPrint to the printer unless it already is, and wait (bounded) until it is operational.

        Cheap when already connected (one status reading), so a reconnect loop may call it repeatedly.
        """
        obs = await self._observe()
        if obs.state in (PrinterState.READY, PrinterState.PRINTING, PrinterState.PAUSED):
            return
        if obs.text not in CONNECTING_TEXTS:
            log.info("%r: printer is %s, connecting on port %s", self, obs.text, self.port)
            port = None if self.port.upper() == "AUTO" else self.port
            await self._call("connect", lambda c: c.connect(port=port, baudrate=self.baudrate))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        seen_connecting = obs.text in CONNECTING_TEXTS
        stale_error = obs.text in ERROR_TEXTS  # until OctoPrint shows the new attempt, the old error stays
        while True:
            await asyncio.sleep(self.poll_interval)
            obs = await self._observe()
            if obs.state in (PrinterState.READY, PrinterState.PRINTING, PrinterState.PAUSED):
                log.info("%r: printer operational", self)
                return
            if obs.text in CONNECTING_TEXTS:
                seen_connecting = True
            elif seen_connecting or (obs.text in ERROR_TEXTS and not stale_error):
                raise PrinterOffline(f"OctoPrint could not connect to the printer: {obs.reason}")
            if loop.time() > deadline:
                raise PrinterOffline(
                    f"printer not operational {self.connect_timeout:.0f}s after connecting: {obs.reason}"
                )

    async def close(self) -> None:
        """Wait for calls in flight (each bounded by the HTTP timeout), then stop the worker threads."""
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)
        pending = [asyncio.wrap_future(f) for f in list(self._pending)]
        await asyncio.gather(*pending, return_exceptions=True)
        self._executor.shutdown(wait=True)  # the threads are idle by now: this only joins them
        self._session.close()

    async def status(self) -> PrinterStatus:
        """The printer's state; OFFLINE with a reason (never an exception) when OctoPrint cannot be asked."""
        try:
            obs = await self._observe()
        except PrinterError as exc:
            reason = str(exc)
            if reason != self._last_offline_reason:
                log.warning("%r: %s", self, reason)
            self._last_offline_reason = reason
            return PrinterStatus(
                state=PrinterState.OFFLINE,
                reason=reason,
                last_result=self._tracker.last_result,
                last_file=self._tracker.last_file,
            )
        self._last_offline_reason = None
        return self._tracker.status(obs)

    async def start(self, path: Path, name: str) -> None:
        """Upload ``path``, select it, start it (octorest ignores upload's select and print flags)."""
        if not path.is_file():
            raise PrinterError(f"cannot start {name}: no file at {path}")
        obs = await self._observe()
        if obs.state is PrinterState.OFFLINE:
            raise PrinterOffline(f"cannot start {name}: {obs.reason}")
        if obs.state is not PrinterState.READY:
            raise PrinterError(f"cannot start {name}: printer is {obs.text}")

        upload_name = remote_name(name)

        def upload(client: OctoRest) -> Any:
            with path.open("rb") as fh:
                return client.upload((upload_name, fh))

        reply = await self._call(f"upload of {name}", upload)
        files = reply.get("files") if isinstance(reply, dict) else None
        remote = ((files or {}).get("local") or {}).get("path") or upload_name
        location = quote(str(remote))
        async with self._lock:
            await self._call(
                f"select of {name}",
                lambda c: c.select(location),
                conflict=f"cannot start {name}: OctoPrint will not select a file now",
            )
            await self._call(
                f"start of {name}", lambda c: c.start(), conflict=f"cannot start {name}: printer is busy"
            )
            self._tracker.started(str(remote), name)
        log.info("%r: started %s (OctoPrint file %s)", self, name, remote)
        await self._settle_start()

    async def _settle_start(self) -> None:
        """Return once OctoPrint has left "Starting" (bounded by the HTTP timeout).

        OctoPrint 1.11.8 loses a pause that arrives while it is "Starting": the state goes Starting → Pausing →
        Printing and the print carries on. Waiting here makes pause() safe right after start().
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while (await self._observe()).text in STARTING_TEXTS:
            if loop.time() > deadline:
                log.warning("%r: OctoPrint still starting the print after %.0fs", self, self.timeout)
                return
            await asyncio.sleep(0.02)

    async def pause(self) -> None:
        await self._call("pause", lambda c: c.pause(), conflict="cannot pause: no print job")

    async def resume(self) -> None:
        await self._call("resume", lambda c: c.resume(), conflict="cannot resume: no print job")

    async def cancel(self) -> None:
        self._tracker.cancel_requested = True
        try:
            await self._call("cancel", lambda c: c.cancel(), conflict="cannot cancel: no print job")
        except BaseException:
            self._tracker.cancel_requested = False
            raise

    async def run_gcode(self, lines: list[str]) -> None:
        commands = [line.strip() for line in lines if line.strip()]
        if commands:
            await self._call(
                "G-code command",
                lambda c: c.gcode(commands),
                conflict="cannot send G-code: printer not operational",
            )
