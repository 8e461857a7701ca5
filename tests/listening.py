"""Which TCP addresses a process tree listens on, read from /proc (no `ss` or `lsof` needed).

/proc/net/tcp and /proc/net/tcp6 list every listening socket of the network namespace by inode;
/proc/PID/fd links name the inodes each process holds.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import psutil

LOOPBACK = {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}


def _listening() -> dict[str, tuple[str, int]]:
    """Socket inode -> (address, port) of every listening TCP socket."""
    found = {}
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            hex_ip, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_ip)  # 32-bit words, each in host (little-endian) order
            ip = ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, width, 4)))
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
                ip = ip.ipv4_mapped
            found[fields[9]] = (str(ip), int(hex_port, 16))
    return found


def _sockets_of(pids: list[int]) -> dict[str, int]:
    """Socket inode -> pid, for every socket the processes hold."""
    owned = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                owned[target[8:-1]] = pid
    return owned


def listeners(*roots: int) -> list[tuple[str, int, str]]:
    """(address, port, process name) of each socket listened on by the roots or their descendants."""
    pids = []
    for root in roots:
        process = psutil.Process(root)
        pids += [process.pid, *(p.pid for p in process.children(recursive=True))]
    owned = _sockets_of(pids)
    out = []
    for inode, (ip, port) in _listening().items():
        if inode in owned:
            try:
                name = psutil.Process(owned[inode]).name()
            except psutil.Error:
                name = "?"
            out.append((ip, port, name))
    return sorted(out)


def beyond_loopback(found: list[tuple[str, int, str]]) -> list[tuple[str, int, str]]:
    return [entry for entry in found if ipaddress.ip_address(entry[0]) not in LOOPBACK]
