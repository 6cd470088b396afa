"""Hosts as Linux network namespaces, for the multi-host test (tests/system/test_hosts.py).

A bridge in this (the root) namespace at ``10.<a>.<b>.1/24`` and one namespace per
host, joined to it by a veth pair, at ``10.<a>.<b>.<10 + i>``: traffic between them stays
inside this machine. A host reaches the broker and whatever else runs here through the
bridge's address; ``cut``/``restore`` take its link down and up (a host cut off from
the network, its own loopback still working: its web app keeps taking requests).

Names carry a random tag, so that parallel runs never meet; ``close`` deletes what
``open`` made. Needs root (``ip netns``); ``probe`` says whether it can be done here.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from dataclasses import dataclass, field


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def probe() -> str | None:
    """None if namespaces can be made here, else why not. ``WALTEST_NO_NETNS=1`` says
    not, to run the fallback (hosts as process groups) where namespaces would work."""
    if os.environ.get("WALTEST_NO_NETNS"):
        return "WALTEST_NO_NETNS is set"
    name = f"wtprobe{secrets.token_hex(3)}"
    try:
        ip("netns", "add", name)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        return f"cannot create a network namespace ({str(detail).strip()})"
    ip("netns", "del", name)
    return None


@dataclass
class Network:
    """``hosts`` namespaces on one bridge."""

    hosts: int
    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    subnet: str = field(default_factory=lambda: f"10.{secrets.randbelow(200) + 20}."
                        f"{secrets.randbelow(250) + 1}")  # fmt: skip
    made: list[str] = field(default_factory=list)  # namespaces, then the bridge

    @property
    def bridge(self) -> str:
        return f"wtb{self.tag}"

    @property
    def gateway(self) -> str:
        """This namespace's address on the bridge: where the hosts find the broker."""
        return f"{self.subnet}.1"

    def namespace(self, i: int) -> str:
        return f"wth{self.tag}{i}"

    def address(self, i: int) -> str:
        return f"{self.subnet}.{10 + i}"

    def veth(self, i: int) -> str:
        return f"wtv{self.tag}{i}"  # the end in this namespace, on the bridge

    def open(self) -> None:
        ip("link", "add", self.bridge, "type", "bridge")
        self.made.append(self.bridge)
        ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for i in range(self.hosts):
            ns, peer = self.namespace(i), f"wtp{self.tag}{i}"
            ip("netns", "add", ns)
            self.made.insert(0, ns)
            ip("link", "add", self.veth(i), "type", "veth", "peer", "name", peer)
            ip("link", "set", peer, "netns", ns)
            ip("link", "set", self.veth(i), "master", self.bridge)
            ip("link", "set", self.veth(i), "up")
            inside = ["netns", "exec", ns, "ip"]
            ip(*inside, "addr", "add", f"{self.address(i)}/24", "dev", peer)
            ip(*inside, "link", "set", peer, "up")
            ip(*inside, "link", "set", "lo", "up")
            ip(*inside, "route", "add", "default", "via", self.gateway)

    def inside(self, i: int, argv: list[str]) -> list[str]:
        """``argv`` run in host ``i``'s namespace (``ip netns exec`` execs it in place:
        the PID started is the process itself)."""
        return ["ip", "netns", "exec", self.namespace(i), *argv]

    def cut(self, i: int) -> None:
        ip("link", "set", self.veth(i), "down")

    def restore(self, i: int) -> None:
        ip("link", "set", self.veth(i), "up")

    def close(self) -> None:
        for name in self.made:
            if name == self.bridge:
                subprocess.run(["ip", "link", "del", name], capture_output=True, timeout=30)
            else:
                subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        self.made.clear()
