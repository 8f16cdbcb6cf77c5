#!/usr/bin/env python3
"""Container health check for pdserve: exit 0 when the service in this container
reports SERVING on grpc.health.v1, 1 otherwise (not listening, NOT_SERVING while
the model loads or the service drains, or no answer within the timeout).

    pdserve-healthcheck [PORT] [SERVICE]

PORT defaults to $PDSERVE_PORT (each image sets it, and so does the service),
SERVICE to "" (the whole server). Installed in the images as
/usr/local/bin/pdserve-healthcheck and used by their HEALTHCHECK; Kubernetes
uses its native gRPC probes instead, except with TLS on (kubelet's gRPC probes
speak no TLS): then exec probes run this script.
"""

from __future__ import annotations

import os
import sys


def check(port: str, service: str = "", timeout: float = 3.0) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from pdserve.common import security

    # The service's own PDSERVE_TLS_* settings: with TLS on, speak TLS and
    # present the service's certificate (mTLS). PDSERVE_TLS_SERVER_NAME names
    # the certificate's host when the certificate does not cover 127.0.0.1.
    try:
        tls = security.from_environment(os.environ).client_tls()
    except ValueError as e:
        print(f"unhealthy: TLS settings: {e}", file=sys.stderr)
        return False
    with security.dial(f"127.0.0.1:{port}", tls, sync=True) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as e:
            print(f"unhealthy: {e.code().name}", file=sys.stderr)
            return False
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str]) -> int:
    port = argv[1] if len(argv) > 1 else os.environ.get("PDSERVE_PORT", "")
    if not port.isdigit():
        print("usage: pdserve-healthcheck PORT [SERVICE] (or set PDSERVE_PORT)", file=sys.stderr)
        return 1  # Docker reserves exit code 2; anything but 0 is unhealthy
    return 0 if check(port, argv[2] if len(argv) > 2 else "") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
