"""Model repository extension: index, unload and load, over both protocols.

Each test reloads magika in `finally`, so a failure here does not leave later tests
without a model.
"""

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from numpy.testing import assert_allclose
from tritonclient.utils import InferenceServerException

import reference as ref

MODELS = ["magika", "minilm", "silero_vad"]


def _states(index):
    return {m["name"]: m["state"] for m in index}


def test_index_http(http_client):
    index = http_client.get_model_repository_index()
    assert sorted(m["name"] for m in index) == MODELS
    assert all(m["state"] == "READY" and m["version"] == "1" for m in index), index


def test_index_grpc(grpc_client):
    index = grpc_client.get_model_repository_index(as_json=True)["models"]
    assert sorted(m["name"] for m in index) == MODELS
    assert all(m["state"] == "READY" and m["version"] == "1" for m in index), index


@pytest.mark.parametrize("proto", ["http", "grpc"])
def test_unload_then_load(http_client, grpc_client, proto):
    if proto == "http":
        client, mod = http_client, httpclient
        index = lambda: http_client.get_model_repository_index()  # noqa: E731
    else:
        client, mod = grpc_client, grpcclient
        index = lambda: grpc_client.get_model_repository_index(as_json=True)["models"]  # noqa: E731

    x = ref.magika_random_batch(2, seed=21)

    def infer():
        inp = mod.InferInput("bytes", list(x.shape), "INT32")
        inp.set_data_from_numpy(x)
        return client.infer("magika", [inp]).as_numpy("target_label")

    try:
        client.unload_model("magika")
        assert not client.is_model_ready("magika")
        # The other models are untouched.
        assert client.is_model_ready("minilm") and client.is_model_ready("silero_vad")
        states = _states(index())
        assert states["magika"] == "UNAVAILABLE"
        assert states["minilm"] == states["silero_vad"] == "READY"
        with pytest.raises(InferenceServerException) as exc:
            infer()
        assert "magika" in exc.value.message()
        if proto == "grpc":
            assert exc.value.status() == "StatusCode.NOT_FOUND"
        else:
            assert exc.value.status() == "404"
    finally:
        client.load_model("magika")

    assert client.is_model_ready("magika")
    assert _states(index())["magika"] == "READY"
    assert_allclose(infer(), ref.magika_ref(x), rtol=ref.RTOL, atol=ref.ATOL)


def test_load_unknown_model(http_client, grpc_client):
    # A load of a model the repository does not have is a failed load (Triton's
    # "failed to load '<m>', ..."), with the error table's code for a failed load.
    with pytest.raises(InferenceServerException) as exc:
        http_client.load_model("no_such_model")
    assert exc.value.status() == "400"
    assert exc.value.message().startswith("failed to load 'no_such_model'"), exc.value.message()
    with pytest.raises(InferenceServerException) as exc:
        grpc_client.load_model("no_such_model")
    assert exc.value.status() == "StatusCode.FAILED_PRECONDITION"
    assert exc.value.message().startswith("failed to load 'no_such_model'"), exc.value.message()


def test_unload_under_traffic(server, grpc_client):
    # Requests the server accepted before the unload finish on the old version with
    # correct results; later ones get a clean 404. Nothing else (no 5xx, no hang).
    client = httpclient.InferenceServerClient(server.http_url, concurrency=16)
    batches = [ref.magika_random_batch(1 + i % 3, seed=100 + i) for i in range(48)]
    outcomes = {"ok": 0, "404": 0}
    try:
        pending = []
        for x in batches:
            inp = httpclient.InferInput("bytes", list(x.shape), "INT32")
            inp.set_data_from_numpy(x)
            pending.append(client.async_infer("magika", [inp]))
        grpc_client.unload_model("magika")
        for x, p in zip(batches, pending):
            try:
                got = p.get_result(timeout=30).as_numpy("target_label")
            except InferenceServerException as e:
                assert e.status() == "404", e
                outcomes["404"] += 1
                continue
            assert_allclose(got, ref.magika_ref(x), rtol=ref.RTOL, atol=ref.ATOL)
            outcomes["ok"] += 1
    finally:
        grpc_client.load_model("magika")
        client.close()
    assert outcomes["ok"] + outcomes["404"] == len(batches)
    assert grpc_client.is_model_ready("magika")
