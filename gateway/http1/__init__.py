"""HTTP/1.1 on the wire, with nothing else of the gateway.

:mod:`gateway.http1.client` speaks to the homeserver over kept-alive connections. Nothing in
this package imports another part of the gateway: it knows bytes, sockets and Trio, not
Matrix.
"""
