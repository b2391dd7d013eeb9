"""The server through tritonclient.grpc and grpcio-health-checking."""

import queue

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from numpy.testing import assert_allclose

import reference as ref

MODELS = ("magika", "minilm", "silero_vad")


def test_health(grpc_client):
    assert grpc_client.is_server_live()
    assert grpc_client.is_server_ready()
    for m in MODELS:
        assert grpc_client.is_model_ready(m), m
        assert grpc_client.is_model_ready(m, model_version="1"), m
    assert not grpc_client.is_model_ready("magika", model_version="2")
    assert not grpc_client.is_model_ready("no_such_model")


@pytest.mark.parametrize("service", ["", "inference.GRPCInferenceService"])
def test_grpc_health_service(server, service):
    with grpc.insecure_channel(server.grpc_url) as channel:
        resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_server_metadata(grpc_client):
    md = grpc_client.get_server_metadata(as_json=True)
    assert md["name"] == "lattice"
    assert "binary_tensor_data" in md["extensions"]


def test_model_metadata(grpc_client):
    md = grpc_client.get_model_metadata("magika", as_json=True)
    assert md["name"] == "magika"
    assert md["versions"] == ["1"]
    # Protobuf JSON renders int64 shape entries as strings.
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in md["inputs"]] == [
        ("bytes", "INT32", [-1, 2048])
    ]
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in md["outputs"]] == [
        ("target_label", "FP32", [-1, 214])
    ]


def test_model_config(grpc_client):
    cfg = grpc_client.get_model_config("magika", as_json=True)["config"]
    assert cfg["name"] == "magika"
    assert cfg["max_batch_size"] == 32
    assert [(i["name"], i["data_type"], [int(d) for d in i["dims"]]) for i in cfg["input"]] == [
        ("bytes", "TYPE_INT32", [2048])
    ]
    assert [(o["name"], o["data_type"], [int(d) for d in o["dims"]]) for o in cfg["output"]] == [
        ("target_label", "TYPE_FP32", [214])
    ]

    minilm = grpc_client.get_model_config("minilm", as_json=True)["config"]
    assert {i["name"]: i["data_type"] for i in minilm["input"]} == {
        "TEXT": "TYPE_STRING",
        "input_ids": "TYPE_INT64",
        "attention_mask": "TYPE_INT64",
        "token_type_ids": "TYPE_INT64",
    }


def _magika_input(x):
    inp = grpcclient.InferInput("bytes", list(x.shape), "INT32")
    inp.set_data_from_numpy(x)
    return inp


def test_magika_real_files(grpc_client):
    paths, x = ref.magika_real_batch()
    res = grpc_client.infer(
        "magika", [_magika_input(x)], outputs=[grpcclient.InferRequestedOutput("target_label")], request_id="r1"
    )
    got = res.as_numpy("target_label")
    assert got.shape == (len(paths), 214)
    assert_allclose(got, ref.magika_ref(x), rtol=ref.RTOL, atol=ref.ATOL)
    labels = ref.magika_labels()
    assert [labels[i] for i in got.argmax(axis=1)] == [ref.MAGIKA_FILES[p] for p in paths]
    resp = res.get_response()
    assert (resp.model_name, resp.model_version, resp.id) == ("magika", "1", "r1")


def test_minilm_text_and_tokens(grpc_client):
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market crashed."]
    text = grpcclient.InferInput("TEXT", [len(texts), 1], "BYTES")
    text.set_data_from_numpy(np.array(texts, dtype=object).reshape(-1, 1))
    emb = grpc_client.infer(
        "minilm", [text], outputs=[grpcclient.InferRequestedOutput("embedding")]
    ).as_numpy("embedding")
    assert emb.shape == (3, 384)
    assert_allclose(emb, ref.minilm_ref(texts), rtol=ref.RTOL, atol=ref.ATOL)
    assert ref.cosine(emb[0], emb[1]) > 0.6
    assert ref.cosine(emb[0], emb[2]) < 0.3

    ids, mask = ref.minilm_tokens(texts)
    inputs = []
    for name, arr in (("input_ids", ids), ("attention_mask", mask), ("token_type_ids", np.zeros_like(ids))):
        inp = grpcclient.InferInput(name, list(arr.shape), "INT64")
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    by_tokens = grpc_client.infer(
        "minilm", inputs, outputs=[grpcclient.InferRequestedOutput("embedding")]
    ).as_numpy("embedding")
    assert_allclose(by_tokens, emb, rtol=ref.RTOL, atol=ref.ATOL)


def test_silero_vad(grpc_client):
    chunk = ref.vad_chunk(seed=3)
    state = np.zeros((2, 1, 128), dtype=np.float32)
    sr = np.array(16000, dtype=np.int64)
    inputs = []
    for name, arr, dt in (("input", chunk, "FP32"), ("state", state, "FP32"), ("sr", sr, "INT64")):
        inp = grpcclient.InferInput(name, list(arr.shape), dt)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    res = grpc_client.infer("silero_vad", inputs)
    exp_out, exp_state = ref.vad_ref(chunk, state)
    assert_allclose(res.as_numpy("output"), exp_out, rtol=ref.RTOL, atol=ref.ATOL)
    assert_allclose(res.as_numpy("stateN"), exp_state, rtol=ref.RTOL, atol=ref.ATOL)


def test_streaming(server):
    # A client of its own: tritonclient allows one stream per client, and a stream
    # left open by a failure here must not leak into other tests.
    client = grpcclient.InferenceServerClient(server.grpc_url)
    results = queue.Queue()
    n = 20
    # Distinct rows (1 to 3 per request) so a response matched to the wrong id
    # would carry the wrong probabilities.
    rng = np.random.default_rng(11)
    sent = {f"req-{i:02d}": rng.integers(0, 256, size=(1 + i % 3, 2048), dtype=np.int32) for i in range(n)}
    try:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        for rid, x in sent.items():
            client.async_stream_infer("magika", [_magika_input(x)], request_id=rid)
        got = {}
        for _ in range(n):
            result, error = results.get(timeout=30)
            assert error is None, error
            rid = result.get_response().id
            assert rid not in got, f"id {rid} answered twice"
            got[rid] = result.as_numpy("target_label")
    finally:
        client.stop_stream()
        client.close()
    assert set(got) == set(sent)
    assert results.empty()
    for rid, x in sent.items():
        assert_allclose(got[rid], ref.magika_ref(x), rtol=ref.RTOL, atol=ref.ATOL, err_msg=rid)


def test_streaming_error_is_in_band(server):
    # One bad request on a stream is answered with an error and the stream keeps going.
    client = grpcclient.InferenceServerClient(server.grpc_url)
    results = queue.Queue()
    good = ref.magika_random_batch(1, seed=12)
    bad = grpcclient.InferInput("bytes", [1, 2048], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 2048), dtype=np.float32))
    try:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        client.async_stream_infer("magika", [bad], request_id="bad")
        client.async_stream_infer("magika", [_magika_input(good)], request_id="good")
        first = results.get(timeout=30)
        second = results.get(timeout=30)
    finally:
        client.stop_stream()
        client.close()
    assert first[0] is None and "FP32" in str(first[1])
    assert second[1] is None
    assert second[0].get_response().id == "good"
    assert_allclose(second[0].as_numpy("target_label"), ref.magika_ref(good), rtol=ref.RTOL, atol=ref.ATOL)


def test_priority_and_timeout_parameters(grpc_client):
    x = ref.magika_random_batch(1, seed=13)
    res = grpc_client.infer("magika", [_magika_input(x)], priority=5, timeout=10_000_000)
    assert_allclose(res.as_numpy("target_label"), ref.magika_ref(x), rtol=ref.RTOL, atol=ref.ATOL)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_request_compression(grpc_client, algorithm):
    x = ref.magika_random_batch(2, seed=14)
    res = grpc_client.infer("magika", [_magika_input(x)], compression_algorithm=algorithm)
    assert_allclose(res.as_numpy("target_label"), ref.magika_ref(x), rtol=ref.RTOL, atol=ref.ATOL)
