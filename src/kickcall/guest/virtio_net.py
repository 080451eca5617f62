"""The guest's virtio-net driver: rx buffers refilled from the interrupt handler, MQ via the control queue."""

from __future__ import annotations

import struct
import time
from typing import Callable

from ..virtio.net import CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, NET_F_CTRL_VQ, NET_F_MAC, NET_F_MQ, NET_F_MTU, \
    NET_F_STATUS, VNET_HDR_SIZE
from ..virtio.ring import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC
from .kernel import GuestKernel
from .virtio_pci import VirtioPciDevice
from .virtio_ring import Vring

__all__ = ["VirtioNetDriver", "NET_WANTED"]

NET_WANTED = ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_RING_F_INDIRECT_DESC)
              | (1 << NET_F_MAC) | (1 << NET_F_STATUS) | (1 << NET_F_MTU) | (1 << NET_F_CTRL_VQ) | (1 << NET_F_MQ))
RX_BUF = 4096


class _TxBuf:
    __slots__ = ("gpa", "busy")

    def __init__(self, gpa: int) -> None:
        self.gpa = gpa
        self.busy = False


class VirtioNetDriver:
    def __init__(self, kernel: GuestKernel, vdev: VirtioPciDevice, *, queue_size: int | None = None) -> None:
        self.k = kernel
        self.vdev = vdev
        self.queue_size = queue_size
        self.mac = b""
        self.max_pairs = 1
        self.pairs = 1
        self.rx: list[Vring] = []
        self.tx: list[Vring] = []
        self.ctrl: Vring | None = None
        self.on_receive: Callable[[int, bytes], None] | None = None
        self._tx_free: list[list[_TxBuf]] = []
        self.rx_packets = 0
        self.tx_packets = 0
        self.tx_full = 0

    def probe(self) -> None:
        v = self.vdev
        v.begin(NET_WANTED)
        cfg = v.read_device_config(0, 12)
        self.mac = cfg[:6]
        if v.has(NET_F_MQ):
            self.max_pairs = max(1, struct.unpack_from("<H", cfg, 8)[0])
        names: list[str] = []
        cbs: list[Callable[[Vring], None] | None] = []
        for p in range(self.max_pairs):
            names += [f"input.{p}", f"output.{p}"]
            cbs += [self._rx_done, self._tx_done]
        if v.has(NET_F_CTRL_VQ):
            names.append("control")
            cbs.append(None)
        vqs = v.find_vqs(names, cbs, [self.queue_size or 0] * len(names))
        self.rx = [vqs[2 * p] for p in range(self.max_pairs)]
        self.tx = [vqs[2 * p + 1] for p in range(self.max_pairs)]
        self.ctrl = vqs[-1] if v.has(NET_F_CTRL_VQ) else None
        for p in range(self.max_pairs):
            self._tx_free.append([_TxBuf(self.k.pages.alloc(RX_BUF)) for _ in range(min(64, self.tx[p].num))])
        v.ready()
        for p in range(self.max_pairs):
            self._fill_rx(p)
        if self.max_pairs > 1 and self.ctrl is not None:
            self._ctrl_cmd(CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", self.max_pairs))
            self.pairs = self.max_pairs

    def _fill_rx(self, p: int) -> None:
        vq = self.rx[p]
        with vq.lock:
            while vq.num_free:
                buf = self.k.pages.alloc(RX_BUF)
                if not vq.add([], [(buf, RX_BUF)], buf):
                    self.k.pages.free(buf)
                    break
            needs = vq.kick_prepare()
        if needs:
            vq.notify()

    def _ctrl_cmd(self, cls: int, cmd: int, data: bytes, timeout: float = 10.0) -> int:
        """virtnet_send_command: add and busy-poll for the ack, as Linux does."""
        vq = self.ctrl
        assert vq is not None
        page = self.k.pages.alloc(4096)
        mem = self.k.memory
        mem.write(page, bytes([cls, cmd]) + data)
        mem.write(page + 2048, b"\xff")
        with vq.lock:
            vq.add([(page, 2 + len(data))], [(page + 2048, 1)], page)
            needs = vq.kick_prepare()
        if needs:
            vq.notify()
        deadline = time.monotonic() + timeout
        while True:
            with vq.lock:
                got = vq.get_buf()
            if got is not None:
                break
            if time.monotonic() > deadline:
                raise TimeoutError("control command not acknowledged")
            time.sleep(0.0005)
        ack = mem.read(page + 2048, 1)[0]
        self.k.pages.free(page)
        return ack

    # -- tx ----------------------------------------------------------------------------------------------
    def send(self, p: int, pkt: bytes) -> bool:
        if len(pkt) + VNET_HDR_SIZE > RX_BUF:
            raise ValueError("packet too large")
        vq = self.tx[p]
        mem = self.k.memory
        with vq.lock:
            free = [b for b in self._tx_free[p] if not b.busy]
            if not free:
                self._reclaim_tx(vq, p)
                free = [b for b in self._tx_free[p] if not b.busy]
                if not free:
                    self.tx_full += 1
                    return False
            b = free[0]
            mem.write(b.gpa, bytes(VNET_HDR_SIZE) + pkt)
            if not vq.add([(b.gpa, VNET_HDR_SIZE + len(pkt))], [], b):
                self.tx_full += 1
                return False
            b.busy = True
            needs = vq.kick_prepare()
        if needs:
            vq.notify()
        self.tx_packets += 1
        return True

    def _reclaim_tx(self, vq: Vring, p: int) -> None:
        while True:
            got = vq.get_buf()
            if got is None:
                return
            got[0].busy = False

    def _tx_done(self, vq: Vring) -> None:
        p = self.tx.index(vq)
        while True:
            with vq.lock:
                vq.disable_cb()
                self._reclaim_tx(vq, p)
                again = not vq.enable_cb()
            if not again:
                return

    # -- rx ----------------------------------------------------------------------------------------------
    def _rx_done(self, vq: Vring) -> None:
        p = self.rx.index(vq)
        mem = self.k.memory
        while True:
            pkts = []
            with vq.lock:
                vq.disable_cb()
                while True:
                    got = vq.get_buf()
                    if got is None:
                        break
                    buf, length = got
                    if length >= VNET_HDR_SIZE:
                        pkts.append(mem.read(buf + VNET_HDR_SIZE, length - VNET_HDR_SIZE))
                    vq.add([], [(buf, RX_BUF)], buf)  # refill
                again = not vq.enable_cb()
                needs = vq.kick_prepare()
            if needs:
                vq.notify()
            for pkt in pkts:
                self.rx_packets += 1
                if self.on_receive is not None:
                    self.on_receive(p, pkt)
            if not again:
                return
