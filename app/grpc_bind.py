"""Serve (2.60) starts each replica's inter-deployment gRPC server on `[::]`, every interface, whatever
the HTTP host says. Routers dial it at the replica's node IP, so binding there instead keeps a
single-host cluster on 127.0.0.1 (and a multi-node one on its node addresses) with nothing else open.
Replica classes call `bind_to_node_ip()` in their constructors: the server starts right after."""
from __future__ import annotations

import ray
from ray.serve._private import replica

_add_port = replica.add_port_to_grpc_server


def _add_port_on_node_ip(server, address: str):
    if address.startswith("[::]:"):
        address = f"{ray.util.get_node_ip_address()}:{address.removeprefix('[::]:')}"
    return _add_port(server, address)


def bind_to_node_ip() -> None:
    replica.add_port_to_grpc_server = _add_port_on_node_ip
