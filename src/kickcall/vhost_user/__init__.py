"""vhost-user: the protocol, a back-end library (serve a kickcall device to QEMU or any front-end),
and the front-end side (a client of any back-end, and a machine device whose queues it serves)."""

from .protocol import BackendReq, FrontendReq, Message, ProtocolError, ProtocolErrorKind, ProtocolFeature

__all__ = ["BackendReq", "FrontendReq", "Message", "ProtocolError", "ProtocolErrorKind", "ProtocolFeature"]
