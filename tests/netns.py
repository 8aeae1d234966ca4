"""Separate hosts on one Linux machine for multi-host tests: network namespaces joined by a bridge.

``Network(["head", "w1", "w2"], local_dir)`` makes one namespace per host, each with its own loopback and an
``eth0`` on a private /24, and a "switch" namespace whose bridge joins them; a veth from the switch into this
process's namespace (``host_ip``) lets the test itself reach every host (and serve them, e.g. an S3 server).
The namespaces share the process table with the test, and the filesystem but for one directory: each host
has its own addresses and ports (every host can run Ray on its default ports), and its own disk at
``local_dir`` (a tmpfs mounted there in the host's own mount namespace, with a ``tmp`` directory for TMPDIR):
the same path on every host, different files, none of them visible to the test. Every command on a host runs
in both of its namespaces (entered through an idle process that holds them, started with the host).

``cut(host)`` takes that host's link to the switch down (a network partition) and ``kill(host)`` kills every
process in its namespace (the machine dies, with its disk); ``boot(host)`` brings a killed host back with an
empty disk. ``close()`` kills what still runs in the namespaces and deletes them, which deletes their links
too. Names carry this process's id; namespaces left behind by a test process that is gone are deleted when
the next ``Network`` starts.

Needs root (``ip netns add``); :func:`unavailable` says why a machine cannot run it.
"""
from __future__ import annotations

import ipaddress
import os
import re
import signal
import subprocess
import time

PREFIX = "rmnet"  # namespace names: rmnet<pid>-<host>; the host side of the uplink: rmnet<pid>


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and res.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")
    return res


def unavailable() -> str | None:
    """Why this machine cannot make network namespaces (None: it can)."""
    name = f"{PREFIX}{os.getpid()}-probe"
    try:
        res = _ip("netns", "add", name, check=False)
    except FileNotFoundError:
        return "the `ip` command (iproute2) is not installed"
    if res.returncode:
        return f"cannot create a network namespace (`ip netns add` needs root or CAP_SYS_ADMIN): {res.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


def namespace_pids(ns: str) -> list[int]:
    res = _ip("netns", "pids", ns, check=False)
    return [int(p) for p in res.stdout.split()] if res.returncode == 0 else []


def _kill_namespace(ns: str, timeout: float = 10.0) -> None:
    """SIGKILL every process in namespace ``ns`` until none is left (a process may fork as it dies)."""
    deadline = time.monotonic() + timeout
    while (pids := namespace_pids(ns)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def remove_leftovers() -> None:
    """Delete the namespaces (and uplinks) of test processes that are gone."""
    names = [line.split()[0] for line in _ip("netns", "list", check=False).stdout.splitlines() if line.strip()]
    for name in names:
        m = re.fullmatch(rf"{PREFIX}(\d+)-\w+", name)
        if m and not _pid_alive(int(m.group(1))):
            _kill_namespace(name)
            _ip("netns", "del", name, check=False)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        m = re.match(rf"\d+: ({PREFIX}(\d+))[@:]", line)
        if m and not _pid_alive(int(m.group(2))):
            _ip("link", "del", m.group(1), check=False)


def _free_subnet() -> ipaddress.IPv4Network:
    """A private /24 that overlaps none of this machine's routes, chosen by process id."""
    used = []
    for line in _ip("-4", "route", "show", "table", "all", check=False).stdout.splitlines():
        dest = line.split()[0] if line.split() else ""
        if dest in ("default", "broadcast", "local", "unreachable"):
            dest = line.split()[1] if len(line.split()) > 1 else ""
        try:
            used.append(ipaddress.ip_network(dest, strict=False))
        except ValueError:
            pass
    start = os.getpid() % 40000
    for k in range(40000):
        n = (start + k) % 40000
        net = ipaddress.ip_network(f"10.{100 + n // 256}.{n % 256}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise RuntimeError("no free 10.x.y.0/24 subnet for the test network")


class Network:
    """Hosts in network namespaces on one bridge; see the module's docstring."""

    def __init__(self, hosts: list[str], local_dir: str):
        assert len(set(hosts)) == len(hosts) and all(re.fullmatch(r"\w{1,10}", h) for h in hosts), hosts
        self.hosts = list(hosts)
        self.local_dir = local_dir
        self._anchors: dict[str, subprocess.Popen] = {}
        self.tag = f"{PREFIX}{os.getpid()}"
        self.switch = f"{self.tag}-sw"
        self.net: ipaddress.IPv4Network | None = None
        self._made: list[str] = []
        self._uplink = False

    # -- names and addresses ----------------------------------------------------------------------
    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def ip(self, host: str) -> str:
        return str(self.net[self.hosts.index(host) + 1])

    @property
    def host_ip(self) -> str:
        """The address of this (the test's) process on the network."""
        return str(self.net[254])

    # -- up and down ---------------------------------------------------------------------------------
    def __enter__(self):
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        remove_leftovers()
        self.net = _free_subnet()
        plen = self.net.prefixlen
        self._add_ns(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, host in enumerate(self.hosts):
            ns = self._add_ns(self.ns(host))
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}", "netns", self.switch)
            _ip("-n", ns, "addr", "add", f"{self.ip(host)}/{plen}", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", self.switch, "link", "set", f"p{i}", "master", "br0", "up")
        _ip("link", "add", self.tag, "type", "veth", "peer", "name", "up0", "netns", self.switch)
        self._uplink = True
        _ip("addr", "add", f"{self.host_ip}/{plen}", "dev", self.tag)
        _ip("link", "set", self.tag, "up")
        _ip("-n", self.switch, "link", "set", "up0", "master", "br0", "up")
        os.makedirs(self.local_dir, exist_ok=True)
        for host in self.hosts:
            self.boot(host)

    def boot(self, host: str, timeout: float = 30.0) -> None:
        """Start ``host``'s idle process: a mount namespace of its own with an empty disk at ``local_dir``."""
        assert not self.pids(host), f"{host} is running"
        d = self.local_dir
        script = f"mount -t tmpfs -o size=1g,mode=0755 rm-{host} {d} && mkdir {d}/tmp && exec sleep infinity"
        anchor = subprocess.Popen(["ip", "netns", "exec", self.ns(host), "sh", "-c", script],
                                  stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._anchors[host] = anchor
        deadline = time.monotonic() + timeout
        while True:  # until the shell has mounted the disk and become `sleep`
            assert anchor.poll() is None, f"cannot give {host} its disk: {anchor.stderr.read().decode()}"
            try:
                if os.path.basename(os.readlink(f"/proc/{anchor.pid}/exe")) == "sleep":
                    return
            except OSError:
                pass
            assert time.monotonic() < deadline, f"{host} did not start"
            time.sleep(0.01)

    def _add_ns(self, ns: str) -> str:
        _ip("netns", "add", ns)
        self._made.append(ns)
        return ns

    def close(self) -> None:
        for anchor in self._anchors.values():
            if anchor.poll() is None:
                anchor.kill()
            anchor.wait()
            anchor.stderr.close()
        self._anchors = {}
        for ns in reversed(self._made):
            _kill_namespace(ns)
            _ip("netns", "del", ns, check=False)
        self._made = []
        if self._uplink:
            _ip("link", "del", self.tag, check=False)  # gone already with its peer's namespace, as a rule
            self._uplink = False

    # -- running things on a host ---------------------------------------------------------------------
    def command(self, host: str, args: list[str]) -> list[str]:
        """``args`` as a command run on ``host`` (in its network and mount namespaces)."""
        anchor = self._anchors.get(host)
        assert anchor is not None and anchor.poll() is None, f"{host} is down"
        return ["nsenter", "--target", str(anchor.pid), "--net", "--mount", f"--wd={os.getcwd()}", "--",
                *map(str, args)]

    def popen(self, host: str, args: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.command(host, args), **kw)

    def run(self, host: str, args: list[str], *, check: bool = False, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(host, args), check=check, **kw)

    def pids(self, host: str) -> list[int]:
        """The processes running on ``host``."""
        return namespace_pids(self.ns(host))

    # -- failures ------------------------------------------------------------------------------------
    def kill(self, host: str) -> list[int]:
        """Every process on ``host`` killed at once (SIGKILL), as if the machine died; returns their ids."""
        pids = self.pids(host)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _kill_namespace(self.ns(host))
        anchor = self._anchors.pop(host, None)
        if anchor is not None:
            anchor.wait()
            anchor.stderr.close()
        return pids

    def cut(self, host: str) -> None:
        """Partition ``host`` from the network: its port on the switch goes down (its processes run on)."""
        _ip("-n", self.switch, "link", "set", f"p{self.hosts.index(host)}", "down")

    def mend(self, host: str) -> None:
        _ip("-n", self.switch, "link", "set", f"p{self.hosts.index(host)}", "up")
