"""An OTLP/gRPC receiver that accepts every export and keeps nothing.

An empty protobuf message is a valid ExportTraceServiceResponse, so any unary call
is answered with zero bytes; no OpenTelemetry packages are needed. Prints the bound
address on one line, then serves until killed.
"""

from concurrent import futures

import grpc


class AcceptAll(grpc.GenericRpcHandler):
    def service(self, handler_call_details):
        return grpc.unary_unary_rpc_method_handler(
            lambda request, context: b"",
            request_deserializer=None,
            response_serializer=None,
        )


def main() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((AcceptAll(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"otlp-sink 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
