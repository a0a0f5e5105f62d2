"""The ``satroute`` command line: ``serve`` here; ``train``, ``evaluate``, ``onboard`` delegated.

Owns: argument parsing (only when ``main`` runs, never at import), turning flags into Settings
overrides (flags win over ``SATROUTE_*`` environment variables), starting uvicorn, SIGHUP, and lazy
delegation: each delegated subcommand's module exposes ``add_arguments(parser)`` and
``run(args) -> int``; a module that is missing gives a one-line error, not a traceback.
``onboard MODEL`` leaves out the provider registry's warnings about unavailable models (its
own error names MODEL's reason).
Does not know: what the delegated commands do.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import errno
import importlib
import importlib.util
import io
import logging
import os
import signal
import socket
import sys
import threading
import time
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Sequence

from proxy import __version__

if TYPE_CHECKING:
    from proxy.logs import Redactor
    from proxy.settings import Settings

DELEGATED = {
    "train": ("scorer.training", "train the Model-SAT scorer (capability instruction tuning)"),
    "evaluate": ("scorer.evaluation", "evaluate routing against baselines"),
    "onboard": ("proxy.onboarding", "run the aptitude test against a model and store its profile"),
    "backup": ("proxy.backup", "copy the state store consistently, also while the proxy runs"),
    "restore": ("proxy.restore", "put a backup back into the state directory, its proxies stopped"),
}


def _delegate_module(name: str) -> ModuleType | None:
    """The module, or None when it (or something it needs) is not installed."""
    try:
        if importlib.util.find_spec(name) is None:
            return None
        module = importlib.import_module(name)
    except ImportError as exc:
        print(f"satroute: cannot load {name}: {exc}", file=sys.stderr)
        return None
    if not (hasattr(module, "add_arguments") and hasattr(module, "run")):
        return None
    return module


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="satroute", description="satroute: an OpenAI-compatible proxy that routes each request with "
                                     "Model-SAT. Commands: serve, train, evaluate, onboard, backup, restore.")
    parser.add_argument("--version", action="version", version=f"satroute {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the OpenAI-compatible routing proxy")
    serve.add_argument("--config", help="providers.yaml (env SATROUTE_CONFIG)")
    serve.add_argument("--host", help="listen address (default 127.0.0.1; env SATROUTE_HOST)")
    serve.add_argument("--port", type=int, help="listen port (default 8000; env SATROUTE_PORT)")
    serve.add_argument("--scorer", choices=["modelsat", "constant"],
                       help="routing scorer (default modelsat; env SATROUTE_SCORER)")
    # Only the chosen delegated subcommand's module is imported (torch is heavy).
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_) in DELEGATED.items():
        p = sub.add_parser(name, help=help_)
        if name == chosen:
            mod = _delegate_module(module)
            if mod is not None:
                mod.add_arguments(p)
            else:
                p.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


class Hangups:
    """SIGHUP's handler while ``satroute serve`` runs (entered on the main thread; elsewhere it
    catches nothing): ``check`` runs on the event loop at the loop's next turn, and the process
    never ends by it. One that comes before the loop runs (the app still being built, the scorer
    loading) waits for it; one after the loop has closed is dropped (the process is ending)."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._check: Callable[[], None] | None = None
        self._pending = False
        self._previous: Any = None

    def __enter__(self) -> Hangups:
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGHUP"):
            self._previous = signal.signal(signal.SIGHUP, self._received)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)

    def attach(self, loop: asyncio.AbstractEventLoop, check: Callable[[], None]) -> None:
        """From now on a SIGHUP runs ``check`` on ``loop``; one received before runs it now."""
        self._loop, self._check = loop, check
        if self._pending:
            self._pending = False
            loop.call_soon(check, context=contextvars.Context())

    def _received(self, signum: int, frame: Any) -> None:
        # A handler runs between two bytecodes of whatever the main thread is doing, the event
        # loop's own code or a reload by the watch included: the check waits for the loop's turn.
        if self._loop is None or self._check is None:
            self._pending = True
            return
        with contextlib.suppress(RuntimeError):  # the loop has closed
            # in a context of its own: the signal may come while a request's task runs, whose
            # request id would be on the check's log lines
            self._loop.call_soon_threadsafe(self._check, context=contextvars.Context())


BACKLOG = 2048  # uvicorn's default, for the sockets opened before it starts


def listening_sockets(host: str, port: int) -> list[socket.socket]:
    """Sockets listening on ``host``:``port``, opened as uvicorn's event loop opens them
    (``loop.create_server``: one per address the host resolves to, an empty host every interface,
    SO_REUSEADDR, an IPv6 socket IPv6-only). An address the machine cannot bind (``::1`` for
    ``localhost`` where IPv6 is turned off) is skipped, as Python 3.13's event loop skips it, unless
    it is the only one. OSError when a socket cannot be opened (none is left open), its
    ``filename`` the address that failed.

    They listen at once: a socket only bound does not hold the port on Linux, so a second
    ``satroute serve`` started while the first is starting would bind it too, and fail only when
    its own app had started."""
    infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    unbindable: OSError | None = None
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            try:
                sock = socket.socket(family, kind, proto)
            except OSError:  # a family this machine lacks (IPv6 turned off): as the event loop, skip it
                continue
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
                sock.listen(BACKLOG)
            except OSError as exc:
                sock.close()
                failed = OSError(exc.errno, exc.strerror, _address(address[0], address[1]))
                if exc.errno != errno.EADDRNOTAVAIL:
                    raise failed from None
                unbindable = failed  # not an address of this machine now: the others may serve
                continue
            sockets.append(sock)
        if not sockets:
            raise unbindable or OSError(f"no socket can be opened for {host!r}")
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host or '*'}:{port}"


def _listen_error(host: str, port: int, exc: OSError) -> str:
    """The line for a port ``listening_sockets`` could not take."""
    where = _address(host, port)
    if exc.filename and exc.filename != where:  # the address the name resolved to that failed
        where += f" ({exc.filename})"
    reason = exc.strerror or str(exc)
    if exc.errno == errno.EADDRINUSE:
        reason += ("; another process listens there (a satroute serve already running?): stop it, or "
                   "choose another port (--port, SATROUTE_PORT)")
    return f"satroute: cannot listen on {where}: {reason}"


def serve(args: argparse.Namespace) -> int:
    from proxy.logs import Redactor, configure_logging
    from pydantic import ValidationError

    from proxy.providers import env_references
    from proxy.settings import Settings, describe_invalid, unknown_variables, warn_unknown_variables

    overrides = {k: v for k in ("config", "host", "port", "scorer")
                 if (v := getattr(args, k)) is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        flags = {k: f"--{k}" for k in overrides}
        print(f"satroute: invalid settings: {describe_invalid(exc, flags)}", file=sys.stderr)
        return 2
    master = settings.master_key_value()
    unknown = unknown_variables(os.environ, env_references(settings.config))
    # A key set under a misspelt name (SATROUTE_MASTERKEY, SATROUTE_MASTER_KEY_FILE) is no mere
    # misspelling: the admin meant every request to need it, and a warning in the start-up log
    # would leave the proxy open to anyone who reaches it. One set to nothing sets nothing, as
    # SATROUTE_MASTER_KEY= does: a warning.
    meant = [name for name, close in unknown if close == "SATROUTE_MASTER_KEY" and os.environ[name]]
    if meant and not master:
        print(f"satroute: {meant[0]} is not a setting satroute reads; did you mean "
              "SATROUTE_MASTER_KEY? Not starting without the master key it looks meant to set: "
              "rename it, or unset it to run without a key", file=sys.stderr)
        return 2
    redactor = Redactor(lambda: [master] if master else [])
    configure_logging(settings.log_level, redactor=redactor,
                      json_lines=settings.log_format == "json")
    warn_unknown_variables(unknown)
    # SIGHUP (the "reload" signal of nginx, HAProxy and systemd's ExecReload=, or the terminal
    # closing) ended the process by its default action, cutting the requests in flight and losing
    # the routing log's pending rows: it is caught from here on, the app's building included.
    with Hangups() as hangups:
        return _serve_app(settings, master, redactor, hangups)


def _serve_app(settings: Settings, master: str | None, redactor: Redactor, hangups: Hangups) -> int:
    """Take the port, build the app and serve it until a signal ends it; the exit status (2: the
    port cannot be taken, or the configuration is invalid)."""
    # the port first: one in use (a proxy already running) is told before anything is started,
    # the local model servers and onboarding included
    try:
        sockets = listening_sockets(settings.host, settings.port)
    except OSError as exc:
        print(_listen_error(settings.host, settings.port, exc), file=sys.stderr)
        return 2
    try:
        return _serve_on(sockets, settings, master, redactor, hangups)
    finally:
        for sock in sockets:
            sock.close()


def _serve_on(sockets: list[socket.socket], settings: Settings, master: str | None, redactor: Redactor,
              hangups: Hangups) -> int:
    """Build the app and serve it on ``sockets`` until a signal ends it; the exit status."""
    import uvicorn

    from proxy.app import create_app
    from proxy.errors import ConfigError, StateStoreError
    from proxy.httpserver import BoundedHttpToolsProtocol

    try:
        app = create_app(settings)
    except ConfigError as exc:
        what = "" if isinstance(exc, StateStoreError) else "invalid configuration: "
        print(f"satroute: {what}{exc}", file=sys.stderr)
        return 2
    registry = app.state.services.registry
    redactor.use(lambda: (*registry.snapshot.secrets, *([master] if master else [])))
    from proxy.auth import is_loopback

    if not master and not is_loopback(settings.host):
        logging.getLogger("satroute.app").warning(
            "listening on %s without SATROUTE_MASTER_KEY: anyone who can reach this port can spend "
            "the configured providers' keys and read /admin and /metrics; set a master key, or "
            "listen on 127.0.0.1", settings.host)
    # SIGTERM: uvicorn stops accepting, gives in-flight requests and streams shutdown_timeout_s, then
    # the app's lifespan shutdown stops background work and saves state; onboarding stops asking at
    # the signal, and its questions already sent share that grace period. log_config=None keeps
    # our JSON handlers on uvicorn's loggers.
    services = app.state.services

    # SIGHUP: providers.yaml is checked at once, as the watch checks it (an invalid file is
    # reported, the last good configuration serves on), and the outcome logged. Once the shutdown
    # has begun it is only logged: a reload then would start work the shutdown has already stopped.

    def hangup() -> None:
        if services.stop_signalled:
            logging.getLogger("satroute.app").info("SIGHUP: shutting down; providers.yaml not checked")
        else:
            registry.reload_now("SIGHUP")
            if services.onboarding is not None:  # an upstream that was down may be back
                again = services.onboarding.retry_failed()
                if again:
                    logging.getLogger("satroute.app").info("SIGHUP: onboarding tried again for %s",
                                                           ", ".join(again))

    class Server(uvicorn.Server):
        async def serve(self, sockets: Any = None) -> None:
            hangups.attach(asyncio.get_running_loop(), hangup)
            await super().serve(sockets)

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started:  # uvicorn leaves its "running on" line to whoever opened the sockets
                self._log_started_message(sockets)

        async def shutdown(self, sockets: Any = None) -> None:
            # SATROUTE_SHUTDOWN_DELAY_S: serving on, new connections too, while /ready says not
            # ready, so that a load balancer (a Kubernetes Service, which learns of the stop only
            # as its endpoints are updated, seconds later) takes the proxy out before its listener
            # closes; Ctrl+C twice ends the wait
            services.leaving = True
            delay = settings.shutdown_delay_s
            if delay > 0 and not self.force_exit:
                logging.getLogger("satroute.app").info(
                    "stop signal: serving on for %.3g s, /ready answering 503, before the shutdown", delay)
                end, ticks = time.monotonic() + delay, 0
                while not self.force_exit and time.monotonic() < end:
                    await asyncio.sleep(min(0.1, max(0.0, end - time.monotonic())))
                    ticks += 1
                    await self.on_tick(ticks)  # uvicorn's clock: the Date header stays right
            services.begin_shutdown()  # onboarding's asks out share the requests' grace period
            await super().shutdown(sockets)

    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            access_log=False, loop="auto", http=BoundedHttpToolsProtocol, backlog=BACKLOG,
                            log_config=None, timeout_graceful_shutdown=settings.shutdown_timeout_s,
                            timeout_keep_alive=settings.keepalive_timeout_s)
    server = Server(config)
    services.forced = lambda: server.force_exit
    try:
        server.run(sockets=sockets)
    except KeyboardInterrupt:
        pass
    return 0 if server.started else 3  # stopped before it started: uvicorn.run's status


class UnavailableWarnings(logging.Filter):
    """Drops the provider registry's "model X unavailable" warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != "model %s unavailable: %s"


def _tolerant_stdout() -> None:
    """A character stdout cannot encode (a model named in Chinese, stdout ASCII or Latin-1 under
    PYTHONIOENCODING or a locale) is written escaped, as Python writes it to stderr: printing the
    summary of a finished `satroute onboard` raised, and the stored run was reported as a
    configuration error with exit 2."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        with contextlib.suppress(ValueError, io.UnsupportedOperation):
            reconfigure(errors="backslashreplace")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _tolerant_stdout()
    args = build_parser(argv).parse_args(argv)
    if args.command == "serve":
        return serve(args)
    module = DELEGATED[args.command][0]
    mod = _delegate_module(module)
    if mod is None:
        print(f"satroute {args.command}: not available in this installation "
              f"(module {module} not found)", file=sys.stderr)
        return 2
    if args.command != "onboard" or not isinstance(getattr(args, "model", None), str):
        return int(mod.run(args))
    # `satroute onboard MODEL` reads the whole providers.yaml, whose registry warns about each
    # model that is unavailable: the others are not the command's concern, and MODEL's reason is
    # in the command's own error, which is then one line
    registry_log, others = logging.getLogger("satroute.providers"), UnavailableWarnings()
    registry_log.addFilter(others)
    try:
        return int(mod.run(args))
    finally:
        registry_log.removeFilter(others)


if __name__ == "__main__":
    sys.exit(main())
