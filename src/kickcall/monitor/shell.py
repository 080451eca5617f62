"""``kickcall shell SOCKET``: an interactive monitor, HMP first, with history and completion.

A line is an HMP command (``info virtio``, ``x-debug-device-event blk0 call 0``) sent through
``human-monitor-command``; a line naming a QMP command runs it with qmp-shell's ``key=value``
arguments (values parsed as JSON when they parse); a line starting with ``{`` is sent as QMP
JSON.  Events that arrive are printed after each command.  History is kept in
``$XDG_STATE_HOME/kickcall/shell_history`` (mode 0600).

``quit`` (HMP, QMP or JSON) ends the session as it ends the process behind the monitor: the
SHUTDOWN event is printed, then one line saying the process is quitting, and the shell exits 0.
A quit whose reply never comes (QEMU may exit first) counts as done when the connection closes.
A SHUTDOWN seen after any other command (another client quit) ends the session the same way.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, TextIO

from .client import QMPClient, QMPCommandError, QMPConnectionError
from .commands import HMP_COMMANDS

__all__ = ["Shell", "main"]


def _history_path() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "kickcall", "shell_history")


def _parse_kv(words: list[str]) -> dict:
    args: dict = {}
    for w in words:
        if "=" not in w:
            raise ValueError(f"argument '{w}' is not key=value")
        k, v = w.split("=", 1)
        try:
            args[k] = json.loads(v)
        except json.JSONDecodeError:
            args[k] = v
    return args


def _is_quit(line: str) -> bool:
    """Whether a shell line asks the monitor's process to quit (HMP ``quit``, QMP ``quit``, JSON)."""
    line = line.strip()
    if line.startswith("{"):
        try:
            obj = json.loads(line)
        except ValueError:
            return False
        if not isinstance(obj, dict):
            return False
        if obj.get("execute") == "quit":
            return True
        return (obj.get("execute") == "human-monitor-command" and isinstance(obj.get("arguments"), dict)
                and str(obj["arguments"].get("command-line", "")).split()[:1] in (["quit"], ["q"]))
    return line.split()[:1] == ["quit"]


class Shell:
    def __init__(self, client: QMPClient, out: TextIO = sys.stdout) -> None:
        self.c = client
        self.out = out
        self.status = 1  # the exit status once one() has returned False
        try:
            self.qmp_commands = sorted(x["name"] for x in client.execute("query-commands"))
        except QMPCommandError:
            self.qmp_commands = []
        self.hmp = "human-monitor-command" in self.qmp_commands
        self.words = sorted({w for k in HMP_COMMANDS for w in k.split() if w.islower() or "-" in w}
                            | set(self.qmp_commands))

    def devices(self) -> list[str]:
        try:
            paths = [d["path"] for d in self.c.execute("x-query-virtio")]
        except (QMPCommandError, QMPConnectionError, TypeError):
            return []
        ids = [p.strip("/").split("/")[-2] for p in paths if p.count("/") >= 3]
        return sorted(set(paths) | set(ids))

    def complete(self, line: str) -> list[str]:
        """Candidates for the last word of *line* (commands, then info topics, then devices)."""
        parts = line.split(" ")
        word = parts[-1]
        if len(parts) == 1:
            cands = sorted({k.split()[0] for k in HMP_COMMANDS} | set(self.qmp_commands))
        elif parts[0] == "info" and len(parts) == 2:
            cands = sorted({k.split()[1] for k in HMP_COMMANDS if k.startswith("info ")})
        else:
            cands = self.devices() + ["kick", "call", "force", "drop-next", "drop-all", "clear", "on", "off"]
        return [c for c in cands if c.startswith(word)]

    def run_line(self, line: str) -> str:
        line = line.strip()
        if not line:
            return ""
        if line.startswith("{"):
            obj = json.loads(line)
            res = self.c.execute(obj["execute"], obj.get("arguments"))
            return json.dumps(res, indent=2)
        words = line.split()
        if words[0] in self.qmp_commands and (not self.hmp or words[0] not in {k.split()[0] for k in HMP_COMMANDS}
                                                or any("=" in w for w in words[1:])):
            res = self.c.execute(words[0], _parse_kv(words[1:]) or None)
            return json.dumps(res, indent=2)
        if not self.hmp:
            raise ValueError(f"unknown command '{words[0]}' (this monitor has no human-monitor-command)")
        text = self.c.execute("human-monitor-command", {"command-line": line})
        return str(text).replace("\r\n", "\n").rstrip("\n")

    def one(self, line: str) -> bool:
        """Run one line and print its result; False when the session is over: the connection is
        gone (``status`` 1) or the monitor's process is quitting (``status`` 0)."""
        quit_asked = _is_quit(line)
        ok = False
        gone: QMPConnectionError | None = None
        try:
            out = self.run_line(line)
            ok = True
            if out:
                print(out, file=self.out)
        except QMPCommandError as e:
            print(f"Error: {e.cls}: {e.desc}", file=self.out)
        except (ValueError, KeyError, TypeError) as e:
            print(f"Error: {e}", file=self.out)
        except QMPConnectionError as e:
            gone = e
        shutdown = False
        for ev in self.c.events():
            print(f"event {ev.get('event')}: {json.dumps(ev.get('data', {}))}", file=self.out)
            shutdown = shutdown or ev.get("event") == "SHUTDOWN"
        if (quit_asked and (ok or gone is not None)) or shutdown:
            # the reply, or the connection closing before it (QEMU may exit first), or the event
            print(f"kickcall shell: the monitor's process is quitting ({self.c.path})", file=self.out)
            self.status = 0
            return False
        if gone is not None:
            print(f"kickcall shell: {gone}", file=self.out)
            self.status = 1
            return False
        return True


def main(path: str, *, stdin: TextIO | None = None) -> int:
    stdin = stdin or sys.stdin
    try:
        client = QMPClient(path).connect()
    except (QMPConnectionError, OSError) as e:
        print(f"kickcall shell: {e}", file=sys.stderr)
        return 2
    sh = Shell(client)
    interactive = stdin.isatty()
    hist = _history_path()
    rl: Any = None  # the readline module, when interactive and available
    if interactive:
        try:
            import readline as rl
        except ImportError:
            rl = None
    if rl is not None:
        os.makedirs(os.path.dirname(hist), mode=0o700, exist_ok=True)
        try:
            rl.read_history_file(hist)
        except OSError:
            pass
        matches: list[str] = []

        def completer(text: str, state: int) -> str | None:
            nonlocal matches
            if state == 0:
                matches = sh.complete(rl.get_line_buffer()[:rl.get_endidx()])
            return matches[state] if state < len(matches) else None

        rl.set_completer(completer)
        rl.set_completer_delims(" ")
        rl.parse_and_bind("tab: complete")
        rl.parse_and_bind("set show-all-if-ambiguous on")
        print(f"kickcall shell on {path} ({client.greeting.get('version', {}).get('package', '?')}); "
              "'help' lists commands, Ctrl-D quits")
    try:
        while True:
            try:
                line = input("(kickcall) ") if interactive else stdin.readline()
            except EOFError:
                break
            if not interactive and line == "":
                break
            if line.strip() in ("exit", "q"):
                break
            if not sh.one(line):
                return sh.status
    except KeyboardInterrupt:
        pass
    finally:
        if rl is not None:
            try:
                rl.set_history_length(1000)
                rl.write_history_file(hist)
                os.chmod(hist, 0o600)
            except OSError:
                pass
        client.close()
    return 0
