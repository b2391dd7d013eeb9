"""Stock clients and tools, unchanged: the asyncio tritonclients on every call (only
infer answers are compressed, as their own request asks), grpcio-reflection (v1alpha)
and a health check per service name."""

import asyncio
import gzip
import zlib

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc.aio as grpcaio
import tritonclient.http.aio as httpaio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

MAGIKA_FEATURES = 2048


def _magika_array(seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 257, size=(1, MAGIKA_FEATURES), dtype=np.int32)


async def _http_aio_every_call(url):
    c = httpaio.InferenceServerClient(url)
    try:
        assert await c.is_server_live()
        assert await c.is_server_ready()
        assert await c.is_model_ready("magika")
        md = await c.get_server_metadata()
        assert md["name"] == "lattice"
        assert (await c.get_model_metadata("magika"))["name"] == "magika"
        assert (await c.get_model_config("magika"))["name"] == "magika"
        stats = await c.get_inference_statistics("magika")
        assert stats["model_stats"][0]["name"] == "magika"
        assert "model_stats" in await c.get_inference_statistics()
        index = await c.get_model_repository_index()
        assert {e["name"] for e in index} >= {"magika", "minilm", "silero_vad"}
        # aiohttp sends Accept-Encoding: gzip, deflate on every request; the infer
        # answer comes back compressed and the client decodes it.
        x = httpaio.InferInput("bytes", [1, MAGIKA_FEATURES], "INT32")
        x.set_data_from_numpy(_magika_array())
        plain = await c.infer("magika", [x])
        gz = await c.infer("magika", [x], response_compression_algorithm="gzip")
        de = await c.infer("magika", [x], response_compression_algorithm="deflate")
        for r in (gz, de):
            np.testing.assert_array_equal(r.as_numpy("target_label"), plain.as_numpy("target_label"))
        # An error answer is plain JSON the client can read.
        with pytest.raises(Exception, match="not found"):
            await c.get_model_metadata("no_such_model")
    finally:
        await c.close()


def test_http_aio_client_every_call(server):
    asyncio.run(_http_aio_every_call(server.http_url))


async def _grpc_aio_every_call(url):
    c = grpcaio.InferenceServerClient(url)
    try:
        assert await c.is_server_live()
        assert await c.is_model_ready("magika")
        assert (await c.get_server_metadata()).name == "lattice"
        assert (await c.get_model_config("magika")).config.name == "magika"
        stats = await c.get_inference_statistics("magika", as_json=True)
        assert stats["model_stats"][0]["name"] == "magika"
        x = grpcaio.InferInput("bytes", [1, MAGIKA_FEATURES], "INT32")
        x.set_data_from_numpy(_magika_array())
        r = await c.infer("magika", [x], compression_algorithm="gzip")
        assert r.as_numpy("target_label").shape[0] == 1
    finally:
        await c.close()


def test_grpc_aio_client_every_call(server):
    asyncio.run(_grpc_aio_every_call(server.grpc_url))


def test_only_infer_answers_are_compressed(base_url):
    # Without Accept-Encoding nothing is compressed.
    h = {"Accept-Encoding": "identity"}
    r = requests.get(f"{base_url}/v2/models/stats", headers=h)
    assert "Content-Encoding" not in r.headers
    # Asked for gzip: metadata, statistics and errors still go out plain.
    h = {"Accept-Encoding": "gzip, deflate"}
    for path in ("/v2", "/v2/models/magika", "/v2/models/magika/config", "/v2/models/stats", "/v2/models/nope"):
        r = requests.get(f"{base_url}{path}", headers=h, stream=True)
        assert "Content-Encoding" not in r.headers, path
        r.json()
    body = {
        "inputs": [{"name": "bytes", "shape": [1, MAGIKA_FEATURES], "datatype": "INT32",
                    "data": _magika_array().ravel().tolist()}],
    }
    raw = {}
    for enc, decode in (("gzip", gzip.decompress), ("deflate", zlib.decompress)):
        r = requests.post(f"{base_url}/v2/models/magika/infer", json=body,
                          headers={"Accept-Encoding": enc}, stream=True)
        assert r.status_code == 200
        assert r.headers["Content-Encoding"] == enc
        raw[enc] = decode(r.raw.read())
    assert raw["gzip"] == raw["deflate"]
    # A failed infer is plain JSON, whatever was asked.
    body["inputs"][0]["shape"] = [1, 3]
    r = requests.post(f"{base_url}/v2/models/magika/infer", json=body,
                      headers={"Accept-Encoding": "gzip"}, stream=True)
    assert r.status_code == 400
    assert "Content-Encoding" not in r.headers


def _served_services(grpc_url):
    with grpc.insecure_channel(grpc_url) as channel:
        return set(ProtoReflectionDescriptorDatabase(channel).get_services())


def test_reflection_v1alpha_lists_every_service(server):
    services = _served_services(server.grpc_url)
    assert {
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "externalscaler.ExternalScaler",
        "lattice.agent.v1.AgentCoordination",
        "lattice.agent.v1.Chat",
        "lattice.agent.v1.ToolCatalog",
    } <= services
    # The descriptor of a message resolves through v1alpha too.
    with grpc.insecure_channel(server.grpc_url) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        fd = db.FindFileContainingSymbol("inference.GRPCInferenceService")
        svc = next(s for s in fd.service if s.name == "GRPCInferenceService")
        assert "ModelInfer" in [m.name for m in svc.method]


def test_health_check_per_served_service(server):
    services = _served_services(server.grpc_url)
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in sorted(services) + [""]:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING, name
        with pytest.raises(grpc.RpcError) as e:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
