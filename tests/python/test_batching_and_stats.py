"""Concurrent clients (so the dynamic batcher merges requests and must hand every
client back its own rows), statistics and the Prometheus metrics port.
"""

import re

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from numpy.testing import assert_allclose
from tritonclient.utils import InferenceServerException

import reference as ref

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "The stock market crashed after the surprise announcement of higher interest rates.",
    "Hi",
    "",  # an empty string is a valid sentence: [CLS] [SEP] only
]


@pytest.fixture
def concurrent_http(server):
    client = httpclient.InferenceServerClient(server.http_url, concurrency=16)
    yield client
    client.close()


def test_concurrent_magika_rows_go_back_to_their_sender(concurrent_http):
    # Requests of 1..4 rows, all in flight at once: merged batches must be cut back
    # at the right offsets.
    rng = np.random.default_rng(41)
    batches = [rng.integers(0, 256, size=(1 + i % 4, 2048), dtype=np.int32) for i in range(48)]
    pending = []
    for i, x in enumerate(batches):
        inp = httpclient.InferInput("bytes", list(x.shape), "INT32")
        inp.set_data_from_numpy(x)
        pending.append(concurrent_http.async_infer("magika", [inp], request_id=str(i)))
    for i, (x, p) in enumerate(zip(batches, pending)):
        res = p.get_result(timeout=30)
        assert res.get_response()["id"] == str(i)
        assert_allclose(res.as_numpy("target_label"), ref.magika_ref(x), rtol=ref.RTOL, atol=ref.ATOL, err_msg=str(i))


def test_concurrent_minilm_text_of_different_lengths(concurrent_http):
    # Each request alone is padded to its own length; merged with others the server
    # tokenizes the whole batch and pads to the longest. Pooling must hide that.
    # 1 or 2 sentences per request, of lengths from 2 tokens ("") to ~20.
    batches = [[SENTENCES[i % len(SENTENCES)], SENTENCES[(i * 5 + 3) % len(SENTENCES)]][: 1 + i % 2] for i in range(24)]
    pending = []
    for texts in batches:
        inp = httpclient.InferInput("TEXT", [len(texts), 1], "BYTES")
        inp.set_data_from_numpy(np.array(texts, dtype=object).reshape(-1, 1))
        pending.append(
            concurrent_http.async_infer("minilm", [inp], outputs=[httpclient.InferRequestedOutput("embedding")])
        )
    for texts, p in zip(batches, pending):
        got = p.get_result(timeout=30).as_numpy("embedding")
        assert got.shape == (len(texts), 384)
        assert_allclose(got, ref.minilm_ref(texts), rtol=ref.RTOL, atol=ref.ATOL, err_msg=str(texts))


def _http_stats(client, model):
    (s,) = client.get_inference_statistics(model)["model_stats"]
    return s


def _grpc_stats(client, model):
    (s,) = client.get_inference_statistics(model, as_json=True)["model_stats"]
    return s


def _count(stats, key):
    # Protobuf JSON renders uint64 as strings and omits zeros.
    return int(stats.get(key, 0))


def test_statistics_count_inferences_and_executions(http_client, grpc_client):
    before = _http_stats(http_client, "magika")
    x = ref.magika_random_batch(3, seed=42)
    inp = httpclient.InferInput("bytes", list(x.shape), "INT32")
    inp.set_data_from_numpy(x)
    http_client.infer("magika", [inp])
    after = _http_stats(http_client, "magika")
    assert after["name"] == "magika" and after["version"] == "1"
    # One request of 3 rows, run alone: 3 inferences, 1 execution, 1 success.
    assert after["inference_count"] - before["inference_count"] == 3
    assert after["execution_count"] - before["execution_count"] == 1
    assert (
        after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"] == 1
    )
    assert after["last_inference"] >= before["last_inference"] > 0

    g = _grpc_stats(grpc_client, "magika")
    assert _count(g, "inference_count") == after["inference_count"]
    assert _count(g, "execution_count") == after["execution_count"]


def _metric(text, name, model):
    m = re.search(rf'^{name}{{model_name="{model}",model_version="1"}} (\S+)$', text, re.M)
    assert m, f"{name} for {model} not in metrics"
    return float(m.group(1))


def test_metrics_endpoint(server, grpc_client):
    url = f"http://{server.metrics_url}/metrics"
    before = requests.get(url, timeout=10)
    assert before.status_code == 200
    assert before.headers["content-type"].startswith("text/plain")
    x = ref.magika_random_batch(2, seed=43)
    inp = grpcclient.InferInput("bytes", list(x.shape), "INT32")
    inp.set_data_from_numpy(x)
    grpc_client.infer("magika", [inp])
    after = requests.get(url, timeout=10).text
    assert _metric(after, "ai_inference_batch_size_sum", "magika") - _metric(
        before.text, "ai_inference_batch_size_sum", "magika"
    ) == 2
    assert _metric(after, "ai_inference_success_total", "magika") - _metric(
        before.text, "ai_inference_success_total", "magika"
    ) == 1
    for model in ("minilm", "silero_vad"):
        assert _metric(after, "ai_inference_pending_requests", model) == 0


def test_invalid_utf8_text_fails_only_its_own_request(server):
    # Text is tokenized per merged batch; one client's bad bytes must not fail the
    # other clients that happened to share its batch. A large request sent first
    # keeps minilm's single instance busy, so the small ones queue up behind it and
    # are merged into one batch with the bad one.
    client = httpclient.InferenceServerClient(server.http_url, concurrency=24)
    long_text = " ".join(["The quick brown fox jumps over the lazy dog."] * 12)
    blocker_texts = np.array([[f"{i} {long_text}"] for i in range(32)], dtype=object)
    try:
        blocker_inp = httpclient.InferInput("TEXT", [32, 1], "BYTES")
        blocker_inp.set_data_from_numpy(blocker_texts)
        blocker = client.async_infer("minilm", [blocker_inp], outputs=[httpclient.InferRequestedOutput("embedding")])
        pending = []
        for i in range(16):
            bad = i == 8
            texts = np.array([[b"\xff\xfe not UTF-8"]] if bad else [[f"sentence {i}"]], dtype=object)
            inp = httpclient.InferInput("TEXT", [1, 1], "BYTES")
            inp.set_data_from_numpy(texts)
            req = client.async_infer("minilm", [inp], outputs=[httpclient.InferRequestedOutput("embedding")])
            pending.append((bad, texts, req))
        assert blocker.get_result(timeout=30).as_numpy("embedding").shape == (32, 384)
        failed_good = []
        for bad, texts, req in pending:
            if bad:
                with pytest.raises(InferenceServerException) as exc:
                    req.get_result(timeout=30)
                assert exc.value.status() == "400" and "UTF-8" in exc.value.message()
                continue
            try:
                emb = req.get_result(timeout=30).as_numpy("embedding")
            except InferenceServerException as e:
                failed_good.append((texts[0, 0], e.status(), e.message()))
                continue
            assert_allclose(emb, ref.minilm_ref([texts[0, 0]]), rtol=ref.RTOL, atol=ref.ATOL)
    finally:
        client.close()
    assert not failed_good, (
        f"{len(failed_good)} of 15 valid requests failed with the invalid one's error, e.g. {failed_good[:2]}"
    )
