"""Virtio constants shared by every layer: feature bits, device status, split-ring layout.

Values from the virtio 1.3 spec (net device, section 5.1) and linux/virtio_*.h.
"""

from __future__ import annotations

import enum


class NetF(enum.IntFlag):
    """virtio-net and transport feature bits (as masks)."""

    CSUM = 1 << 0
    GUEST_CSUM = 1 << 1
    CTRL_GUEST_OFFLOADS = 1 << 2
    MTU = 1 << 3
    MAC = 1 << 5
    GUEST_TSO4 = 1 << 7
    GUEST_TSO6 = 1 << 8
    GUEST_ECN = 1 << 9
    GUEST_UFO = 1 << 10
    HOST_TSO4 = 1 << 11
    HOST_TSO6 = 1 << 12
    HOST_ECN = 1 << 13
    HOST_UFO = 1 << 14
    MRG_RXBUF = 1 << 15
    STATUS = 1 << 16
    CTRL_VQ = 1 << 17
    CTRL_RX = 1 << 18
    CTRL_VLAN = 1 << 19
    CTRL_RX_EXTRA = 1 << 20
    GUEST_ANNOUNCE = 1 << 21
    MQ = 1 << 22
    CTRL_MAC_ADDR = 1 << 23
    NOTIFY_ON_EMPTY = 1 << 24
    ANY_LAYOUT = 1 << 27
    RING_INDIRECT_DESC = 1 << 28
    RING_EVENT_IDX = 1 << 29
    # bit 30 is VHOST_USER_F_PROTOCOL_FEATURES on the vhost-user wire
    VERSION_1 = 1 << 32
    ACCESS_PLATFORM = 1 << 33
    RING_PACKED = 1 << 34
    IN_ORDER = 1 << 35
    ORDER_PLATFORM = 1 << 36
    SR_IOV = 1 << 37
    NOTIFICATION_DATA = 1 << 38
    RING_RESET = 1 << 40
    HASH_REPORT = 1 << 57
    RSS = 1 << 60
    SPEED_DUPLEX = 1 << 63


VHOST_F_LOG_ALL = 1 << 26
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30


class Status(enum.IntFlag):
    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    NEEDS_RESET = 64
    FAILED = 128


# split ring flags
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1

DESC_SIZE = 16
VIRTIO_NET_HDR_LEN = 12  # virtio_net_hdr_v1 (VERSION_1 or MRG_RXBUF): num_buffers included
MAX_RING_SIZE = 32768


def desc_table_size(num: int) -> int:
    return DESC_SIZE * num


def avail_ring_size(num: int) -> int:
    # flags, idx, ring[num], used_event
    return 2 + 2 + 2 * num + 2


def used_ring_size(num: int) -> int:
    # flags, idx, ring[num] of {u32 id, u32 len}, avail_event
    return 2 + 2 + 8 * num + 2


def is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def describe_features(features: int, names: type[enum.IntFlag] = NetF) -> str:
    """Human-readable list of set feature bits, unknown bits as numbers."""
    parts = []
    for bit in range(64):
        if features & (1 << bit):
            try:
                parts.append(names(1 << bit).name or str(bit))
            except ValueError:
                parts.append(f"bit{bit}")
    return "|".join(parts) if parts else "0"
