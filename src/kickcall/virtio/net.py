"""virtio-net with rx/tx queue pairs (MQ through the control queue) on a loopback or socket-pair backend.

Queues: rx0, tx0, rx1, tx1, ..., and the control queue last when more than one pair is offered.
Each packet is preceded by the 12-byte ``virtio_net_hdr_v1``.  Backends:

* ``loopback``: a packet sent on pair *i* comes back on pair *i*'s rx queue;
* ``socketpair``: each pair is an AF_UNIX SOCK_SEQPACKET socket pair; the device owns one end and
  an echo peer thread (the "remote host") the other, so every packet crosses a real socket twice.

A packet that finds no rx buffer waits in the backend (bounded) until the driver posts buffers
and kicks the rx queue; nothing is dropped silently (drops are counted).
"""

from __future__ import annotations

import collections
import logging
import os
import select
import socket
import struct

from .device import VirtIODevice
from .queue import VirtQueue, VirtQueueElement, VirtQueueError, iov_from_buf, iov_size, iov_to_buf
from ..threads import named_thread

__all__ = ["VirtIONet", "LoopbackBackend", "SocketPairBackend", "VNET_HDR_SIZE", "NET_FEATURES"]

log = logging.getLogger("kickcall.virtio.net")

VIRTIO_ID_NET = 1
NET_F_MTU, NET_F_MAC, NET_F_STATUS, NET_F_CTRL_VQ, NET_F_MQ = 3, 5, 16, 17, 22
VNET_HDR = struct.Struct("<BBHHHHH")
VNET_HDR_SIZE = VNET_HDR.size  # 12
CTRL_MQ = 4
CTRL_MQ_VQ_PAIRS_SET = 0
CTRL_OK, CTRL_ERR = 0, 1
MAX_PACKET = 65550
BACKLOG_MAX = 1024

NET_FEATURES = {
    NET_F_MTU: ("VIRTIO_NET_F_MTU", "Device max MTU reporting supported"),
    NET_F_MAC: ("VIRTIO_NET_F_MAC", "Device has given MAC address"),
    NET_F_STATUS: ("VIRTIO_NET_F_STATUS", "Configuration status field available"),
    NET_F_CTRL_VQ: ("VIRTIO_NET_F_CTRL_VQ", "Control channel available"),
    NET_F_MQ: ("VIRTIO_NET_F_MQ", "Multiqueue with automatic receive steering supported"),
}


class NetBackend:
    """Where tx packets go and rx packets come from."""

    kind = "none"

    def __init__(self) -> None:
        self.dev: VirtIONet | None = None
        self.loop = None
        self.sent = 0
        self.received = 0
        self.drops = 0

    def attach(self, dev: "VirtIONet", loop) -> None:
        self.dev = dev
        self.loop = loop

    def send(self, pair: int, pkt: bytes) -> None:
        raise NotImplementedError

    def rx_ready(self, pair: int) -> None:
        """The driver posted rx buffers on *pair*."""

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def close(self) -> None:
        pass


class LoopbackBackend(NetBackend):
    kind = "loopback"

    def __init__(self, pairs: int) -> None:
        super().__init__()
        self.backlog: list[collections.deque[bytes]] = [collections.deque() for _ in range(pairs)]

    def send(self, pair: int, pkt: bytes) -> None:
        self.sent += 1
        q = self.backlog[pair]
        if len(q) >= BACKLOG_MAX:
            self.drops += 1
            return
        q.append(pkt)
        self.rx_ready(pair)

    def rx_ready(self, pair: int) -> None:
        dev = self.dev
        q = self.backlog[pair]
        while q and dev is not None and dev.receive(pair, q[0]):
            q.popleft()
            self.received += 1


class SocketPairBackend(NetBackend):
    kind = "socketpair"

    def __init__(self, pairs: int) -> None:
        super().__init__()
        self.socks = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(pairs)]
        for dev_end, _peer in self.socks:
            dev_end.setblocking(False)
        self.held: list[bytes | None] = [None] * pairs
        self._reading = [False] * pairs
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._peer = named_thread(self._echo_peer, "kc-net-peer")
        self.echoed = 0
        self._peer.start()

    def _echo_peer(self) -> None:
        peers = {p.fileno(): p for _d, p in self.socks}
        ep = select.epoll()
        try:
            for fd in peers:
                ep.register(fd, select.EPOLLIN)
            ep.register(self._stop_r, select.EPOLLIN)
            while True:
                for fd, _ in ep.poll():
                    if fd == self._stop_r:
                        return
                    try:
                        pkt = peers[fd].recv(MAX_PACKET)
                    except OSError:
                        continue
                    if pkt:
                        try:
                            peers[fd].send(pkt)
                            self.echoed += 1
                        except OSError:
                            self.drops += 1
        finally:
            ep.close()

    def start(self) -> None:
        for i in range(len(self.socks)):
            self._watch(i, True)

    def stop(self) -> None:
        for i in range(len(self.socks)):
            self._watch(i, False)

    def _watch(self, pair: int, on: bool) -> None:
        if self.loop is None or self._reading[pair] == on:
            return
        fd = self.socks[pair][0].fileno()
        if on:
            self.loop.set_fd_handler(fd, lambda p=pair: self._readable(p))
        else:
            self.loop.remove_fd_handler(fd)
        self._reading[pair] = on

    def send(self, pair: int, pkt: bytes) -> None:
        try:
            self.socks[pair][0].send(pkt)
            self.sent += 1
        except (BlockingIOError, OSError):
            self.drops += 1

    def _readable(self, pair: int) -> None:
        dev = self.dev
        for _ in range(64):
            pkt = self.held[pair]
            if pkt is None:
                try:
                    pkt = self.socks[pair][0].recv(MAX_PACKET)
                except BlockingIOError:
                    return
                except OSError:
                    return
            if dev is not None and dev.receive(pair, pkt):
                self.held[pair] = None
                self.received += 1
            else:
                self.held[pair] = pkt
                self._watch(pair, False)  # no rx buffer: stop reading until the driver posts some
                return

    def rx_ready(self, pair: int) -> None:
        if self.held[pair] is not None:
            dev = self.dev
            if dev is not None and dev.receive(pair, self.held[pair]):  # type: ignore[arg-type]
                self.held[pair] = None
                self.received += 1
            else:
                return
        if self.dev is not None and self.dev.vm_running:
            self._watch(pair, True)

    def close(self) -> None:
        self.stop()
        os.write(self._stop_w, b"x")
        self._peer.join(5)
        os.close(self._stop_r)
        os.close(self._stop_w)
        for a, b in self.socks:
            a.close()
            b.close()


class VirtIONet(VirtIODevice):
    device_id = VIRTIO_ID_NET
    type_name = "virtio-net"
    feature_table = NET_FEATURES

    def __init__(self, name: str, *, queue_pairs: int = 1, queue_size: int = 256, backend: str = "loopback",
                 mac: bytes | None = None, loop=None) -> None:
        nq = 2 * queue_pairs + (1 if queue_pairs > 1 else 0)
        super().__init__(name, queue_sizes=[queue_size] * nq)
        self.max_pairs = queue_pairs
        self.curr_pairs = 1
        self.mac = mac or bytes([0x52, 0x54, 0x00, 0x12, 0x34, 0x56])
        self.host_features |= (1 << NET_F_MAC) | (1 << NET_F_STATUS) | (1 << NET_F_MTU)
        if queue_pairs > 1:
            self.host_features |= (1 << NET_F_CTRL_VQ) | (1 << NET_F_MQ)
        if backend == "loopback":
            self.backend: NetBackend = LoopbackBackend(queue_pairs)
        elif backend == "socketpair":
            self.backend = SocketPairBackend(queue_pairs)
        else:
            raise ValueError(f"unknown net backend {backend!r} (loopback or socketpair)")
        self.backend.attach(self, loop)
        self.tx_packets = self.rx_packets = self.rx_no_buffer = 0

    @property
    def ctrl_vq(self) -> VirtQueue | None:
        return self.queues[-1] if self.max_pairs > 1 else None

    def get_config(self) -> bytes:
        return self.mac + struct.pack("<HHH", 1, self.max_pairs, 1500)

    def device_reset(self) -> None:
        self.curr_pairs = 1

    def set_status(self, status: int) -> None:
        super().set_status(status)
        if self.can_process():
            self.backend.start()

    def vm_state_change(self, running: bool) -> None:
        super().vm_state_change(running)
        if running:
            self.backend.start()
            for p in range(self.max_pairs):
                self.backend.rx_ready(p)
        else:
            self.backend.stop()

    def close(self) -> None:
        self.backend.close()

    # -- queues --------------------------------------------------------------------------------------
    def handle_output(self, vq: VirtQueue) -> None:
        if vq is self.ctrl_vq:
            self.process_queue_loop(vq, self._handle_ctrl)
        elif vq.index % 2:  # tx
            self.process_queue_loop(vq, self._handle_tx)
        else:  # rx buffers posted
            self.backend.rx_ready(vq.index // 2)

    def _handle_tx(self, vq: VirtQueue, elem: VirtQueueElement) -> None:
        mem = self.mem
        assert mem is not None
        if elem.in_sg:
            self.virtio_error(f"{vq.name}: tx chain with device-writable buffers")
            return
        n = iov_size(elem.out_sg)
        if n < VNET_HDR_SIZE:
            self.virtio_error(f"{vq.name}: tx chain shorter than the virtio-net header")
            return
        pair = vq.index // 2
        if n - VNET_HDR_SIZE <= MAX_PACKET and pair < self.curr_pairs:
            pkt = iov_to_buf(mem, elem.out_sg, VNET_HDR_SIZE, n - VNET_HDR_SIZE)
            self.tx_packets += 1
            self.backend.send(pair, pkt)
        else:
            self.backend.drops += 1
        vq.push(elem, 0)
        self.notify(vq)

    def receive(self, pair: int, pkt: bytes) -> bool:
        """Put *pkt* into pair *pair*'s rx queue; False if there is no buffer for it now."""
        if pair >= self.max_pairs:
            return True
        vq = self.queues[2 * pair]
        if not self.can_process() or not vq.ready:
            return False
        mem = self.mem
        assert mem is not None
        saved = vq.save_notify_fields()
        try:
            elem = vq.pop()
            if elem is None:
                vq.set_notification(True)
                elem = vq.pop()
                if elem is None:
                    self.rx_no_buffer += 1
                    return False
        except VirtQueueError as e:
            vq.count_error(e.kind)
            self.virtio_error(str(e))
            if self.restore_notify.fix_on:
                vq.restore_notify_fields(saved)
            return True
        if elem.out_sg:
            self.virtio_error(f"{vq.name}: rx chain with device-readable buffers")
            if self.restore_notify.fix_on:
                vq.restore_notify_fields(saved)
            return True
        need = VNET_HDR_SIZE + len(pkt)
        if iov_size(elem.in_sg) < need:
            self.virtio_error(f"{vq.name}: rx buffer of {iov_size(elem.in_sg)} bytes for a {need}-byte packet")
            if self.restore_notify.fix_on:
                vq.restore_notify_fields(saved)
            return True
        iov_from_buf(mem, elem.in_sg, 0, VNET_HDR.pack(0, 0, 0, 0, 0, 0, 1) + pkt)
        vq.push(elem, need)
        self.rx_packets += 1
        self.notify(vq)
        return True

    def _handle_ctrl(self, vq: VirtQueue, elem: VirtQueueElement) -> None:
        mem = self.mem
        assert mem is not None
        if iov_size(elem.out_sg) < 2 or iov_size(elem.in_sg) < 1:
            self.virtio_error(f"{vq.name}: control request without header or ack")
            return
        req = iov_to_buf(mem, elem.out_sg, 0, iov_size(elem.out_sg))
        cls, cmd = req[0], req[1]
        ack = CTRL_ERR
        if cls == CTRL_MQ and cmd == CTRL_MQ_VQ_PAIRS_SET and len(req) >= 4:
            (pairs,) = struct.unpack_from("<H", req, 2)
            if 1 <= pairs <= self.max_pairs:
                self.curr_pairs = pairs
                ack = CTRL_OK
        gpa, n = elem.in_sg[-1]
        mem.write(gpa + n - 1, bytes([ack]))
        vq.push(elem, 1)
        self.notify(vq)
