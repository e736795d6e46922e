"""vLLM's OpenAI-compatible server (`vllm serve`, the real one) on localhost, for the length of a `with`.

The server runs in a session (process group) of its own, so that stopping it reaches the API server and
the engine-core and worker processes it starts, and a Ctrl-C typed at moeq reaches moeq only: moeq then
stops the group itself (SIGTERM, then SIGKILL after a grace period) on success, on failure and on
Ctrl-C or SIGTERM alike, and checks that the port is free again. If moeq is killed outright, the API
server gets SIGTERM from the kernel (parent-death signal) and shuts its children down itself.
"""
import contextlib
import ctypes
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from moeq.errors import UserError

HOST = "127.0.0.1"
PORT_TRIES = 100
STOP_GRACE_S = 30
LOG_TAIL = 30


def port_free(port: int, host: str = HOST) -> bool:
    """Whether a server could listen on the port now. SO_REUSEADDR, as uvicorn sets it: connections of a
    stopped server still in TIME_WAIT do not hold the port, a listener does."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(first: int, log=print) -> int:
    """`first`, or the next free port after it (said in the log)."""
    for port in range(first, first + PORT_TRIES):
        if port_free(port):
            if port != first:
                log(f"[serve] port {first} is in use: the server listens on {port} instead")
            return port
    raise UserError(f"ports {first}-{first + PORT_TRIES - 1} are all in use on {HOST}; pick another with --port")


def server_flags(model_path: str, llm: dict, extra: dict | None = None) -> list[str]:
    """vllm.LLM keyword arguments as `vllm serve` flags, spelt by vLLM's own parser (a boolean is --x or
    --no-x as vLLM defines it) and parsed by it, so a setting the server would refuse fails here."""
    try:
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
    except ImportError:  # vLLM before the launchers package (0.26, the GPU's) keeps it with the OpenAI server
        from vllm.entrypoints.openai.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    parser = make_arg_parser(FlexibleArgumentParser())
    actions = {opt: a for a in parser._actions for opt in a.option_strings}
    flags = []
    for key, value in {**llm, **(extra or {})}.items():
        opt = "--" + key.replace("_", "-")
        action = actions.get(opt)
        if action is None:
            raise UserError(f"engine argument {key!r} has no `vllm serve` flag ({opt})")
        if value is None:
            continue
        if isinstance(value, bool):
            if value:
                flags.append(opt)
            elif f"--no-{key.replace('_', '-')}" in actions:
                flags.append(f"--no-{key.replace('_', '-')}")
            elif action.default not in (False, None):
                raise UserError(f"engine argument {key}=false cannot be given to `vllm serve` ({opt} has no --no- form)")
            continue
        flags += [opt, json.dumps(value) if isinstance(value, (dict, list)) else str(value)]
    try:
        parser.parse_args([str(model_path), *flags])
    except SystemExit:
        raise UserError(f"`vllm serve` refuses these flags: {' '.join(flags)}") from None
    return flags


def _die_with_parent():
    """In the child, before exec: SIGTERM when moeq dies, so a killed moeq leaves no server behind."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Server:
    """`with Server(path, flags, log_file) as s:` -> s.url, once /health answers."""

    def __init__(self, model_path: str, flags: list[str], log_file: Path, port: int = 8000, env: dict | None = None,
                 start_timeout: float = 900, log=print):
        self.model_path, self.flags, self.log_file = str(model_path), list(flags), Path(log_file)
        self.first_port, self.env, self.start_timeout, self.log = port, env, start_timeout, log
        self.proc, self.port = None, None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", self.model_path,
                "--host", HOST, "--port", str(self.port), *self.flags]

    def tail(self, n: int = LOG_TAIL) -> str:
        lines = self.log_file.read_text(errors="replace").splitlines() if self.log_file.exists() else []
        return "\n".join(lines[-n:])

    def __enter__(self):
        self.port = free_port(self.first_port, self.log)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as out:
            self.proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, start_new_session=True, preexec_fn=_die_with_parent)
        self.log(f"[serve] vllm serve started (pid {self.proc.pid}, port {self.port}), log {self.log_file}")
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()

    def wait_healthy(self):
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.start_timeout:
            if self.proc.poll() is not None:
                raise ServerFailed(f"vllm serve exited {self.proc.returncode} before it was ready; the last lines "
                                   f"of its log ({self.log_file}):\n{self.tail()}", self.tail(400))
            # HTTPException: a probe of a port in the ephemeral range that nothing listens on yet can connect to
            # itself (TCP simultaneous open) and read its own request back as the reply (CI, 2026-12-03)
            with contextlib.suppress(OSError, http.client.HTTPException):
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        self.log(f"[serve] server ready on port {self.port} after {time.monotonic() - t0:.0f}s")
                        return
            time.sleep(0.5)
        raise ServerFailed(f"vllm serve did not answer {self.url}/health within {self.start_timeout:.0f}s; the last "
                           f"lines of its log ({self.log_file}):\n{self.tail()}", self.tail(400))

    def stop(self):
        """SIGTERM to the server's process group, SIGKILL after STOP_GRACE_S; then the port must be free."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # a session leader: its pid is the group id
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.log(f"[serve] server did not stop within {STOP_GRACE_S}s of SIGTERM: killing its process group")
        # the engine core and workers may outlive the API server by a moment: wait for the whole group
        deadline = time.monotonic() + STOP_GRACE_S
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            if group_alive(pgid):
                os.killpg(pgid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None
        for _ in range(50):
            if port_free(self.port):
                break
            time.sleep(0.2)
        self.log(f"[serve] server stopped; port {self.port} " + ("free" if port_free(self.port) else "STILL IN USE"))


class ServerFailed(RuntimeError):
    """The server never answered; `cause` is vLLM's own root error from its log, when it logged one."""
    def __init__(self, message: str, log_tail: str):
        self.cause = root_error(log_tail)
        super().__init__(message + (f"\nvLLM's error: {self.cause}" if self.cause else ""))
        self.log_tail = log_tail


# an exception line as Python prints it, bare or behind vLLM's "(EngineCore pid=N) ERROR date [file:line] " prefix
EXCEPTION = re.compile(r"^(?:\(\w+ pid=\d+\) )?(?:ERROR \S+ \S+ \[[^\]]+\] )?([\w.]+(?:Error|Exception|Unsupported)): (.+)")
# vLLM's wrappers around the engine process's exception: the cause is the line they point at
WRAPPERS = re.compile(r"Engine core initialization failed|See root cause above|Engine process failed to start")


def root_error(log: str) -> str | None:
    """The first exception line in a server log that is not one of vLLM's wrappers around it."""
    for line in log.splitlines():
        if (m := EXCEPTION.match(line)) and not WRAPPERS.search(line):
            return f"{m[1]}: {m[2].strip()}"[:500]
    return None


def group_alive(pgid: int) -> bool:
    """Any process left in the group (zombies of our own child aside)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Ctrl-C and SIGTERM stop moeq at once, wherever it is, and the server's `with` then stops the server.
    A handler of our own for SIGINT too: inside vLLM's bench client, asyncio's default one only cancels the
    client's task, which the client absorbs and goes on sending."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
