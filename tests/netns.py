"""Real network faults for tests: a network namespace joined to this machine by a veth pair, and a delay proxy.

A process started with :meth:`Netns.prefix` (``ip netns exec NS ...``) sees one interface, ``ns_ip``, and reaches
this machine only at ``host_ip`` over the veth pair; everything else (loopback included) is its own. The faults
act on that pair, so they hit real TCP the way a bad link does:

* :meth:`Netns.loss` — ``iptables -m statistic --mode random --probability P -j DROP`` inside the namespace,
  both directions (a lossy Wi-Fi link: TCP retransmits, keepalives get late);
* :meth:`Netns.rate` — ``tc qdisc ... tbf`` on both ends of the pair (a 64 kbit/s cellular link);
* :meth:`Netns.link` — ``ip link set ... down/up`` (a partition: the cable is pulled);
* :class:`DelayProxy` — this kernel has no ``netem``, so delay and jitter come from a userspace TCP proxy on
  ``host_ip`` that holds every chunk for ``delay ± jitter`` seconds (order kept, as TCP would).

Addresses: one /30 out of 10.231.0.0/16, made by :func:`create_netns` on this machine only and removed by
:meth:`Netns.close`; a /30 already routed here is never taken. Where namespaces cannot be made (not root, no
``ip``, no CAP_NET_ADMIN) :func:`create_netns` raises :class:`NetnsUnavailable` with the reason, and the tests skip
with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import os
import random
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field

TEST_RANGE = ipaddress.ip_network("10.231.0.0/16")  # the only addresses these tests ever create or talk to


class NetnsUnavailable(RuntimeError):
    """This machine cannot give the test a namespace (the test skips with this message)."""


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {res.stderr.strip() or res.stdout.strip()}")
    return res


def _used_networks() -> list[ipaddress.IPv4Network]:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True).stdout
    routes = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True).stdout
    nets = []
    for word in (out + " " + routes).split():
        with contextlib.suppress(ValueError):
            if "/" in word:
                nets.append(ipaddress.ip_network(word, strict=False))
    return [n for n in nets if isinstance(n, ipaddress.IPv4Network)]


_ALLOCATE = threading.Lock()  # scenarios create their namespaces concurrently (one thread each)
_TAKEN: set[ipaddress.IPv4Network] = set()  # subnets handed out by this process, not yet on an interface
_SERIAL = itertools.count()  # unique interface names within the process (the pid makes them unique across)


def _free_subnet() -> ipaddress.IPv4Network:
    """A /30 no interface uses and no other scenario of this process has been given (call under _ALLOCATE)."""
    used = [n for n in _used_networks() if n.overlaps(TEST_RANGE)] + list(_TAKEN)
    candidates = list(TEST_RANGE.subnets(new_prefix=30))
    random.shuffle(candidates)
    for net in candidates:
        if not any(net.overlaps(u) for u in used):
            _TAKEN.add(net)
            return net
    raise NetnsUnavailable(f"no free /30 left in {TEST_RANGE}")


@dataclass
class Netns:
    """One namespace and its veth pair; ``host_ip`` is this machine's end, ``ns_ip`` the namespace's."""

    name: str
    host_if: str
    ns_if: str
    host_ip: str
    ns_ip: str
    faults: list[str] = field(default_factory=list)  # what is applied now, for logs

    def prefix(self) -> list[str]:
        """Command prefix that runs a program inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def loss(self, probability: float) -> None:
        """Drop each packet in either direction with ``probability`` (0 removes the rules)."""
        _ip("iptables", "-F", "INPUT", ns=self.name)
        _ip("iptables", "-F", "OUTPUT", ns=self.name)
        self.faults = [f for f in self.faults if not f.startswith("loss")]
        if probability > 0:
            for chain in ("INPUT", "OUTPUT"):
                _ip("iptables", "-A", chain, "-i" if chain == "INPUT" else "-o", self.ns_if, "-m", "statistic",
                    "--mode", "random", "--probability", f"{probability:.4f}", "-j", "DROP", ns=self.name)
            self.faults.append(f"loss {probability:.0%}")

    def rate(self, kbit: int | None) -> None:
        """Cap both directions to ``kbit`` kbit/s with a token bucket (None removes the cap)."""
        for dev, ns in ((self.ns_if, self.name), (self.host_if, None)):
            _ip("tc", "qdisc", "del", "dev", dev, "root", ns=ns, check=False)
            if kbit:
                # burst: one MTU-sized packet plus a little; latency: how long a packet may wait in the bucket
                _ip("tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{kbit}kbit", "burst", "4kb",
                    "latency", "2s", ns=ns)
        self.faults = [f for f in self.faults if not f.startswith("rate")]
        if kbit:
            self.faults.append(f"rate {kbit} kbit/s")

    def link(self, up: bool) -> None:
        """Pull (``up=False``) or plug back the namespace's end of the cable."""
        _ip("ip", "link", "set", self.ns_if, "up" if up else "down", ns=self.name)

    def close(self) -> None:
        _ip("ip", "netns", "del", self.name, check=False)
        _ip("ip", "link", "del", self.host_if, check=False)  # normally gone with its peer


def create_netns(tag: str) -> Netns:
    """A fresh namespace ``sc-<tag>-<pid>`` with a veth pair on a free /30 of :data:`TEST_RANGE`."""
    if shutil.which("ip") is None:
        raise NetnsUnavailable("the ip command (iproute2) is not installed")
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root (CAP_NET_ADMIN)")
    with _ALLOCATE:  # two scenarios starting at once must not draw the same names or subnet
        suffix = f"{os.getpid() % 100000}x{next(_SERIAL)}"
        net = _free_subnet()
    name = f"sc-{tag}-{suffix}"[:30]
    host_if, ns_if = f"sch{suffix}", f"scn{suffix}"
    assert len(host_if) <= 15, host_if  # IFNAMSIZ
    host_ip, ns_ip = (str(a) for a in list(net.hosts())[:2])
    ns = Netns(name, host_if, ns_if, host_ip, ns_ip)
    try:
        _ip("ip", "netns", "add", name)
        _ip("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _ip("ip", "link", "set", ns_if, "netns", name)
        _ip("ip", "addr", "add", f"{host_ip}/30", "dev", host_if)
        _ip("ip", "link", "set", host_if, "up")
        _ip("ip", "addr", "add", f"{ns_ip}/30", "dev", ns_if, ns=name)
        _ip("ip", "link", "set", ns_if, "up", ns=name)
        _ip("ip", "link", "set", "lo", "up", ns=name)
    except RuntimeError as exc:
        ns.close()
        raise NetnsUnavailable(f"cannot create a network namespace here: {exc}") from None
    return ns


def require_tools(*tools: str) -> None:
    """Raise :class:`NetnsUnavailable` naming the first fault tool that is missing (iptables, tc)."""
    for tool in tools:
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            raise NetnsUnavailable(f"{tool} is not installed (scripts/setup.sh installs it)")


# --------------------------------------------------------------------------------------------- delay proxy


class DelayProxy:
    """A TCP proxy on ``listen_host`` that forwards to ``target`` holding each chunk ``delay ± jitter`` s.

    Each direction keeps its own queue with non-decreasing release times, so bytes stay in order (TCP's own
    guarantee) while the gaps between them jitter. Runs its own asyncio loop in a daemon thread.
    """

    def __init__(self, listen_host: str, target: tuple[str, int], delay_s: float, jitter_s: float) -> None:
        self.listen_host, self.target = listen_host, target
        self.delay_s, self.jitter_s = delay_s, jitter_s
        self.port = 0
        self.connections = 0
        self.delays: list[float] = []  # the hold time each chunk actually got (for the report)
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="delay-proxy", daemon=True)
        self._tasks: set[asyncio.Task] = set()

    def start(self) -> DelayProxy:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        fut.result(10)
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._client, self.listen_host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        tasks = [asyncio.ensure_future(self._pipe(reader, up_writer)),
                 asyncio.ensure_future(self._pipe(up_reader, writer))]
        self._tasks.update(tasks)
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            t.cancel()
        for w in (writer, up_writer):
            w.close()
        self._tasks.difference_update(tasks)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        last_release = 0.0

        async def release() -> None:
            while True:
                at, data = await queue.get()
                if not data:
                    writer.close()
                    return
                await asyncio.sleep(max(0.0, at - time.monotonic()))
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(release())
        try:
            while True:
                data = await reader.read(65536)
                hold = max(0.0, random.uniform(self.delay_s - self.jitter_s, self.delay_s + self.jitter_s))
                at = max(last_release, time.monotonic() + hold)
                last_release = at
                self.delays.append(hold)
                await queue.put((at, data))
                if not data:
                    break
            await sender
        finally:
            sender.cancel()

    def stop(self) -> None:
        async def _stop() -> None:
            if self._server is not None:
                self._server.close()
            for t in list(self._tasks):
                t.cancel()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(_stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
