"""Warm process starts: a single-threaded process that has imported torch forks workers.

A fresh ``python -m corral.train.worker`` spends seconds importing torch before it does
anything; a trial of a search, or a small service job, is mostly that. A fork server is a
process that imported the heavy modules once and forks a child for each request, so a
child starts in milliseconds with them already loaded (the zygote of Android, the
forkserver of `multiprocessing`, here able to run a module's ``__main__`` with a given
command line, environment, folder and file descriptors, as `subprocess.Popen` would).

- `ForkServer.fork` forks the calling process into a server: for a process that is
  single-threaded and has imported what its children need (a service job at its start,
  whose workers then start warm). `ForkServer.spawn` starts a fresh interpreter that
  imports the modules and serves: for a process that already runs threads (the service's
  runner, whose job processes start warm).
- `ForkServer.popen` returns a `ForkedProcess`, which has what the engines use of a
  `Popen`: ``pid``, ``stdout``, ``poll``, ``wait``, ``returncode``. The child is in a
  session of its own (stopped as a group, as an exec'd one), and the server reports its
  exit code, as the server is its parent.
- `install` makes a server the one this process's local engine starts workers with; a
  command line it cannot run warm (another interpreter or module) is exec'd as before.

A server never starts a thread (a fork copies only the calling thread, so a lock another
thread held would stay held in the child forever); it waits on its sockets and on SIGCHLD
through a wake-up pipe. A forked child differs from an exec'd one in a few ways, handled
here: torch's thread count is set from ``OMP_NUM_THREADS`` (OpenMP read it when the
server loaded it; numpy's and Python's random states reseed themselves at a fork), and
``sys.path`` starts with the child's folder and its ``PYTHONPATH``. It keeps the
server's hash seed (``PYTHONHASHSEED``), so a command whose environment sets one is
exec'd instead. It exits with `os._exit` after the exit handlers, as the worker does.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import logging
import os
import runpy
import select
import selectors
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import IO, Any

from corral.errors import LaunchError

log = logging.getLogger("corral.engines")

#: Largest request (command line and environment, as JSON) a server reads.
_MAX_REQUEST = 1 << 20
#: Descriptors a request may pass: the status socket, the output, and the caller's own.
_MAX_FDS = 16
#: Seconds a forked server waits for its children once its caller has ended.
LINGER_S = 5.0
#: Seconds a request waits for the server to say it forked (it may still be importing).
_FORKED_TIMEOUT_S = 120.0


class ForkServerGone(LaunchError):
    """The server is not there to fork (it failed to import, or died): exec instead."""


class ForkedProcess:
    """A child of a fork server, watched through its status socket: the server sends its
    pid once forked and its exit code once it has reaped it."""

    def __init__(self, status: socket.socket, stdout: IO[bytes] | None) -> None:
        self._status = status
        self.stdout = stdout
        self.returncode: int | None = None
        ready, _, _ = select.select([status], [], [], _FORKED_TIMEOUT_S)
        first = status.recv(64) if ready else b""
        if not first.startswith(b"pid "):
            status.close()
            raise ForkServerGone("the fork server did not fork the process")
        self.pid = int(first.split()[1])

    def poll(self) -> int | None:
        """The exit code once the child ended, else None (never blocks)."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.wait(0.0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the child's end; `subprocess.TimeoutExpired` after `timeout` s."""
        if self.returncode is not None:
            return self.returncode
        ready, _, _ = select.select([self._status], [], [], timeout)
        if not ready:
            raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
        message = self._status.recv(64)
        self._status.close()
        if message.startswith(b"exit "):
            self.returncode = int(message.split()[1])
        else:  # the server died: nobody can reap it now, so it is waited on by pid
            self.returncode = self._outlived_server()
        return self.returncode

    def _outlived_server(self) -> int:
        """The server is gone: the child, now init's, is waited for until it ends; its
        code is unknown, reported as SIGKILL's."""
        while Path(f"/proc/{self.pid}").exists():
            try:
                stat = Path(f"/proc/{self.pid}/stat").read_text()
                state = stat.rsplit(")", 1)[1].split()[0]
            except OSError:
                break
            if state == "Z":
                break
            time.sleep(0.05)
        return -signal.SIGKILL


class ForkServer:
    """The caller's end of a fork server; see the module's docstring."""

    def __init__(
        self, sock: socket.socket, pid: int, modules: tuple[str, ...], popen: Any = None
    ) -> None:
        #: The modules it runs as ``__main__`` (and imported before serving).
        self._sock, self.pid, self.modules = sock, pid, modules
        self._popen: subprocess.Popen[bytes] | None = popen

    @classmethod
    def fork(cls, modules: tuple[str, ...], preload: tuple[str, ...] = ()) -> ForkServer:
        """Fork this process into a server of `modules` (imported by the server, so the
        caller goes on at once, with `preload`: what they import later, such as torch's
        compiler that the first optimizer imports, 1.5 s). The caller must be
        single-threaded, as after its imports. The server is in a process group of its
        own, so that a signal to the caller's group leaves it there for the caller to stop
        its children through; when the caller ends, it waits `LINGER_S` for its children
        (which die with the caller, see `corral.engines.watchdog`), kills what is left,
        and ends."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            ours.close()
            os.setpgid(0, 0)
            _serve_forever(theirs, (*modules, *preload), linger=LINGER_S)
        theirs.close()
        return cls(ours, pid, modules)

    @classmethod
    def spawn(cls, modules: tuple[str, ...], preload: tuple[str, ...] = ()) -> ForkServer:
        """Start a fresh interpreter that imports `modules` and `preload` and serves; for
        a caller that runs threads. It ends when the caller does; its children go on."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        main = f"import sys; from {__name__} import serve_main; serve_main(sys.argv[1:])"
        argv = [sys.executable, "-c", main, str(theirs.fileno()), *modules, *preload]
        popen = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, pass_fds=(theirs.fileno(),), start_new_session=True
        )
        theirs.close()
        return cls(ours, popen.pid, modules, popen)

    def can_run(self, argv: list[str], env: dict[str, str]) -> bool:
        """Whether `argv` is ``python -m MODULE …`` of one of its modules, with this
        interpreter and the server's hash seed."""
        return (
            len(argv) >= 3
            and argv[0] == sys.executable
            and argv[1] == "-m"
            and argv[2] in self.modules
            and env.get("PYTHONHASHSEED") in (None, os.environ.get("PYTHONHASHSEED"))
        )

    def popen(
        self,
        argv: list[str],
        *,
        env: dict[str, str],
        cwd: str | None = None,
        stdout: int,
        pass_fds: tuple[int, ...] = (),
        pipe: IO[bytes] | None = None,
    ) -> ForkedProcess:
        """Fork ``python -m MODULE ARGS`` (`argv`, see `can_run`) with `env`, in `cwd`,
        its stdout and stderr to `stdout`, keeping `pass_fds` at their numbers. `pipe`
        is the read end of `stdout`, kept as the process's ``stdout``. Raises
        `ForkServerGone` when the server is not there."""
        mine, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        request = {"argv": argv[2:], "env": env, "cwd": cwd or os.getcwd(), "keep": pass_fds}
        try:
            fds = [child.fileno(), stdout, *pass_fds]
            socket.send_fds(self._sock, [json.dumps(request).encode()], fds)
        except OSError as exc:
            mine.close()
            raise ForkServerGone(f"the fork server is gone: {exc}") from None
        finally:
            child.close()
        return ForkedProcess(mine, pipe)

    def close(self) -> None:
        """Stop the server and reap it: at once for a spawned one (its children go on);
        a forked one first waits for its children, as after the caller's end."""
        self._sock.close()
        if self._popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(timeout=5.0)
            return
        deadline = time.monotonic() + LINGER_S + 1.0
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(self.pid, os.WNOHANG) == (0, 0):
                if time.monotonic() > deadline:
                    os.kill(self.pid, signal.SIGKILL)
                    os.waitpid(self.pid, 0)
                    break
                time.sleep(0.01)


_installed: ForkServer | None = None


def install(server: ForkServer | None) -> None:
    """Make `server` the one this process's local engine forks workers with (None: exec
    every process)."""
    global _installed
    _installed = server


def installed() -> ForkServer | None:
    """The fork server `install` set, if any."""
    return _installed


def start(argv: list[str], env: dict[str, str], *, stdout: int, cwd: str | None = None,
          pass_fds: tuple[int, ...] = (), pipe: IO[bytes] | None = None,
          server: ForkServer | None = None) -> ForkedProcess | None:  # fmt: skip
    """`argv` forked by `server` (default: the installed one) if it can run it; None when
    it cannot or is gone (the caller then execs it, as without a server)."""
    server = server or _installed
    if server is None or not server.can_run(argv, env):
        return None
    try:
        return server.popen(argv, env=env, cwd=cwd, stdout=stdout, pass_fds=pass_fds, pipe=pipe)
    except ForkServerGone as exc:
        log.warning("%s; starting processes afresh", exc)
        if server is _installed:
            install(None)
        return None


# -- the server's side ------------------------------------------------------------------


def _serve_forever(sock: socket.socket, modules: tuple[str, ...], linger: float = 0.0) -> None:
    """Import `modules`, then fork a child per request until the caller's end closes;
    then wait up to `linger` seconds for the children, and kill what is left."""
    code = 0
    try:
        for name in modules:
            importlib.import_module(name)
        children: dict[int, socket.socket] = {}
        _serve(sock, children)
        if linger:
            _outlast(children, linger)
    except BaseException:  # a server that cannot serve says why and ends
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _serve(sock: socket.socket, children: dict[int, socket.socket]) -> None:
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is for the caller, which ends it
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not a handler the caller had set
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            if key.fileobj is sock:
                try:
                    message, fds, _, _ = socket.recv_fds(sock, _MAX_REQUEST, _MAX_FDS)
                except OSError:
                    message, fds = b"", []
                if not message:
                    return  # the caller is gone
                _fork_child(message, fds, children)
            else:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 4096)
        _reap(children)


def _outlast(children: dict[int, socket.socket], linger: float) -> None:
    """Reap the children as they end, for up to `linger` seconds; then kill the process
    groups of those left, and reap them."""
    deadline = time.monotonic() + linger
    while children and time.monotonic() < deadline:
        _reap(children)
        time.sleep(0.02)
    for pid in children:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
    while children:
        _reap(children)
        time.sleep(0.01)


def _reap(children: dict[int, socket.socket]) -> None:
    """Send each ended child's exit code to whoever asked for it."""
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:  # none left to wait for
            for left in children.values():
                left.close()
            children.clear()
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.send(f"exit {os.waitstatus_to_exitcode(status)}".encode())
            conn.close()


def _fork_child(message: bytes, fds: list[int], children: dict[int, socket.socket]) -> None:
    request = json.loads(message)
    status = socket.socket(fileno=fds[0])
    # its pid is sent once it leads its session: a group signal sent at once reaches it
    led_r, led_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(led_r)
        _become(request, fds, led_w)
    os.close(led_w)
    os.read(led_r, 1)  # b"" too if it died first
    os.close(led_r)
    for fd in fds[1:]:
        os.close(fd)
    children[pid] = status
    with contextlib.suppress(OSError):
        status.send(f"pid {pid}".encode())


def _become(request: dict[str, Any], fds: list[int], led: int) -> None:
    """In the forked child: lead a session (then say so on `led`), take the request's
    descriptors, folder and environment, and run its module as ``__main__``; never
    returns."""
    code = 1
    try:
        os.setsid()
        os.write(led, b"1")
        os.close(led)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        keep = [int(fd) for fd in request["keep"]]
        # above every number asked for first, so that no dup2 overwrites a received one
        moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, 1024) for fd in fds]
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(moved[1], 1)
        os.dup2(moved[1], 2)
        for number, fd in zip(keep, moved[2:], strict=True):
            os.dup2(fd, number)  # inheritable, as pass_fds leaves them
        for name in os.listdir("/proc/self/fd"):
            if int(name) not in {0, 1, 2, *keep}:
                with contextlib.suppress(OSError):
                    os.close(int(name))
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        _fresh_state(request["cwd"])
        module, *args = request["argv"]
        sys.argv = [module, *args]
        sys.modules.pop(module, None)  # run afresh as __main__, as ``python -m`` does
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if not isinstance(exc.code, int | None):
                print(exc.code, file=sys.stderr)
        import atexit

        atexit._run_exitfuncs()
        logging.shutdown()
    except BaseException:  # printed where an exec'd process would print it
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _fresh_state(cwd: str) -> None:
    """What a fresh interpreter would have had different from the server's copy."""
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [cwd, *extra, *(p for p in sys.path[1:] if p not in extra)]
    torch = sys.modules.get("torch")
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if torch is not None and threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))


def serve_main(args: list[str]) -> None:
    """A spawned server's entry: ``FD MODULE…`` (see `ForkServer.spawn`)."""
    _serve_forever(socket.socket(fileno=int(args[0])), tuple(args[1:]))
