"""Test helpers for meshq: a virtual LAN of network namespaces on one machine."""

from .lan import Host, LanError, VirtualLan, lan_available

__all__ = ["Host", "LanError", "VirtualLan", "lan_available"]
