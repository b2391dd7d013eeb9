"""Error texts clients match on are Triton's, word for word, through every stock
client (http, http.aio, grpc, grpc.aio); the status codes stay the error table's."""

import asyncio

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

UNKNOWN = "Request for unknown model: 'no_such_model' is not found"
UNKNOWN_VERSION = "Request for unknown model: 'magika' version 9 is not found"
BAD_VERSION = (
    "failed to get model version from specified version string 'abc' (details: stol), "
    "version should be an integral value > 0"
)
NEGATIVE_VERSION = "invalid model version specified '-1' , version should be an integral value > 0"


def _magika_input(mod):
    x = mod.InferInput("bytes", [1, 2048], "INT32")
    x.set_data_from_numpy(np.zeros((1, 2048), dtype=np.int32))
    return x


def _sync_calls(client, mod):
    """(what, call, expected message, expected status) through one sync client."""
    grpc_like = mod is grpcclient
    nf = "StatusCode.NOT_FOUND" if grpc_like else "404"
    bad = "StatusCode.INVALID_ARGUMENT" if grpc_like else "400"
    return [
        ("infer unknown", lambda: client.infer("no_such_model", [_magika_input(mod)]), UNKNOWN, nf),
        ("metadata unknown", lambda: client.get_model_metadata("no_such_model"), UNKNOWN, nf),
        ("config unknown", lambda: client.get_model_config("no_such_model"), UNKNOWN, nf),
        ("stats unknown", lambda: client.get_inference_statistics("no_such_model"), UNKNOWN, nf),
        ("unknown version", lambda: client.get_model_metadata("magika", model_version="9"), UNKNOWN_VERSION, nf),
        ("unparsable version", lambda: client.get_model_metadata("magika", model_version="abc"), BAD_VERSION, bad),
        ("negative version", lambda: client.infer("magika", [_magika_input(mod)], model_version="-1"),
         NEGATIVE_VERSION, bad),
    ]


@pytest.mark.parametrize("proto", ["http", "grpc"])
def test_sync_clients_see_triton_texts(server, proto):
    mod = httpclient if proto == "http" else grpcclient
    url = server.http_url if proto == "http" else server.grpc_url
    client = mod.InferenceServerClient(url)
    try:
        for what, call, message, status in _sync_calls(client, mod):
            with pytest.raises(InferenceServerException) as exc:
                call()
            assert exc.value.message() == message, what
            assert exc.value.status() == status, what
    finally:
        client.close()


async def _aio_texts(mod, url):
    client = mod.InferenceServerClient(url)
    try:
        for call, message in [
            (client.infer("no_such_model", [_magika_input(mod)]), UNKNOWN),
            (client.get_model_metadata("no_such_model"), UNKNOWN),
            (client.get_model_metadata("magika", model_version="9"), UNKNOWN_VERSION),
            (client.get_model_metadata("magika", model_version="abc"), BAD_VERSION),
        ]:
            with pytest.raises(InferenceServerException) as exc:
                await call
            assert exc.value.message() == message
    finally:
        await client.close()


@pytest.mark.parametrize("proto", ["http", "grpc"])
def test_aio_clients_see_triton_texts(server, proto):
    mod = httpaio if proto == "http" else grpcaio
    asyncio.run(_aio_texts(mod, server.http_url if proto == "http" else server.grpc_url))


def test_long_unknown_names_are_capped(http_client):
    name = "m" * 5000
    with pytest.raises(InferenceServerException) as exc:
        http_client.get_model_metadata(name)
    msg = exc.value.message()
    assert msg == f"Request for unknown model: '{'m' * 128}...' is not found"


def _both_contents_request():
    req = service_pb2.ModelInferRequest(model_name="magika")
    inp = req.inputs.add(name="bytes", datatype="INT32", shape=[1, 2048])
    inp.contents.int_contents.extend([0] * 2048)
    req.raw_input_contents.append(np.zeros(2048, dtype=np.int32).tobytes())
    return req


CONTENTS_AND_RAW = "contents field must not be specified when using raw_input_contents for 'bytes' for model 'magika'"


def test_grpc_contents_and_raw_contents(server):
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as exc:
            stub.ModelInfer(_both_contents_request(), timeout=10)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.details() == CONTENTS_AND_RAW


def test_grpc_aio_contents_and_raw_contents(server):
    async def run():
        async with grpc.aio.insecure_channel(server.grpc_url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await stub.ModelInfer(_both_contents_request(), timeout=10)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert exc.value.details() == CONTENTS_AND_RAW

    asyncio.run(run())


def test_http_data_and_binary_data(base_url):
    import json

    import requests

    header = {"inputs": [{"name": "bytes", "shape": [1, 1], "datatype": "INT32", "data": [1],
                          "parameters": {"binary_data_size": 4}}]}
    head = json.dumps(header).encode()
    r = requests.post(f"{base_url}/v2/models/magika/infer", data=head + b"\0\0\0\0",
                      headers={"Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 400
    assert r.json()["error"] == (
        "Input must set only one of the following fields: 'data', 'binary_data_size' in 'parameters', "
        "'shared_memory_region' in 'parameters'. But set 'data' 'binary_data_size'"
    )
