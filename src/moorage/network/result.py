"""CNI results and errors as plugins print them."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from typing import Any


def result_ips(result: Mapping[str, Any]) -> tuple[str, ...]:
    """The pod's addresses in a result of any supported version, IPv4 first, then IPv6.

    0.3.0 and later: ``ips[].address`` is a CIDR; an address whose ``interface`` index
    points at an interface outside the sandbox (the host side of a veth, a bridge) is not a
    pod address, nor is a loopback address (a loopback plugin's). 0.1/0.2 results
    (``ip4.ip``, ``ip6.ip``) are read too. Gateways are ignored.
    """
    found: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    interfaces = result.get("interfaces")
    if not isinstance(interfaces, list):
        interfaces = []
    ips = result.get("ips")
    if isinstance(ips, list):
        for entry in ips:
            if not isinstance(entry, dict):
                continue
            index = entry.get("interface")
            if (
                isinstance(index, int)
                and not isinstance(index, bool)
                and 0 <= index < len(interfaces)
            ):
                iface = interfaces[index]
                if isinstance(iface, dict) and not iface.get("sandbox"):
                    continue
            address = _address(entry.get("address"))
            if address is not None and not address.is_loopback:
                found.append(address)
    for key in ("ip4", "ip6"):
        legacy = result.get(key)
        if isinstance(legacy, dict):
            address = _address(legacy.get("ip"))
            if address is not None and not address.is_loopback:
                found.append(address)
    seen: set[str] = set()
    ordered: list[str] = []
    for address in sorted(found, key=lambda a: a.version):  # stable: keeps result order
        text = str(address)
        if text not in seen:
            seen.add(text)
            ordered.append(text)
    return tuple(ordered)


def _address(value: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return ipaddress.ip_interface(value).ip
    except ValueError:
        return None


def parse_error(stdout: bytes) -> tuple[int | None, str, str]:
    """(code, msg, details) of a CNI error printed on stdout, or (None, "", "")."""
    try:
        doc = json.loads(stdout)
    except (ValueError, UnicodeDecodeError):
        return None, "", ""
    if not isinstance(doc, dict):
        return None, "", ""
    code = doc.get("code")
    msg = doc.get("msg")
    details = doc.get("details")
    return (
        code if isinstance(code, int) and not isinstance(code, bool) else None,
        msg if isinstance(msg, str) else "",
        details if isinstance(details, str) else "",
    )


def parse_result(stdout: bytes) -> dict[str, Any]:
    """A plugin's ADD result; raises ValueError when it is not a JSON object."""
    doc = json.loads(stdout)
    if not isinstance(doc, dict):
        raise ValueError("the result is not a JSON object")
    return doc
