"""`POST /v1/embeddings` through the stock `openai` client: the vectors equal the OIP
`embedding` output for the same text (float and base64 encodings), `usage` counts the
tokens the model's tokenizer makes, requests are counted by the same model statistics
as OIP requests, and mistakes answer in OpenAI's error shape."""

import base64

import numpy as np
import openai
import pytest
import requests
import tritonclient.http as httpclient
from tokenizers import Tokenizer

from conftest import MODELS

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Lattice serves ONNX models over the Open Inference Protocol.",
    "Embeddings map sentences to vectors; similar meaning, nearby vectors.",
]


@pytest.fixture(scope="module")
def oa(server):
    c = openai.OpenAI(base_url=f"http://{server.http_url}/v1", api_key="unused", max_retries=0)
    yield c
    c.close()


def _oip(http_client, texts):
    x = httpclient.InferInput("TEXT", [len(texts), 1], "BYTES")
    x.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=np.object_))
    r = http_client.infer("minilm", [x], outputs=[httpclient.InferRequestedOutput("embedding")])
    return r.as_numpy("embedding")


def _token_count(texts):
    tok = Tokenizer.from_file(str(MODELS / "minilm" / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(128)
    return sum(len(e.ids) for e in tok.encode_batch(texts))


def _inference_count(http_client):
    stats = http_client.get_inference_statistics("minilm")["model_stats"]
    return sum(int(s["inference_count"]) for s in stats)


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_vectors_equal_the_oip_output(oa, http_client, encoding):
    want = _oip(http_client, TEXTS)
    before = _inference_count(http_client)
    r = oa.embeddings.create(model="minilm", input=TEXTS, encoding_format=encoding)
    assert r.object == "list" and r.model == "minilm"
    assert [d.index for d in r.data] == [0, 1, 2] and all(d.object == "embedding" for d in r.data)
    if encoding == "base64":
        # Asked for explicitly, the client hands the string over as it came.
        got = np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in r.data])
    else:
        got = np.array([d.embedding for d in r.data], dtype=np.float32)
    assert got.shape == (3, 384)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert r.usage.prompt_tokens == r.usage.total_tokens == _token_count(TEXTS)
    # Counted by the same model version's statistics as OIP requests: one item each.
    assert _inference_count(http_client) == before + len(TEXTS)


def test_one_string_and_the_default_encoding(oa, http_client):
    # The client asks for base64 by default and decodes it itself.
    r = oa.embeddings.create(model="minilm", input=TEXTS[1])
    assert len(r.data) == 1
    np.testing.assert_allclose(np.array(r.data[0].embedding, dtype=np.float32),
                               _oip(http_client, [TEXTS[1]])[0], rtol=1e-4, atol=1e-5)
    assert r.usage.prompt_tokens == _token_count([TEXTS[1]])


def test_errors_in_openai_shape(oa, base_url):
    with pytest.raises(openai.NotFoundError) as exc:
        oa.embeddings.create(model="no_such_model", input="hello")
    assert exc.value.status_code == 404
    err = exc.value.body
    assert err["code"] == "model_not_found" and err["type"] == "invalid_request_error"
    assert "no_such_model" in err["message"]
    # Over the model's max_batch_size (32): 400 naming the limit.
    with pytest.raises(openai.BadRequestError) as exc:
        oa.embeddings.create(model="minilm", input=["word"] * 33)
    assert "32" in exc.value.body["message"]
    for bad in ([], "", [""], [[101, 102]]):
        with pytest.raises(openai.BadRequestError) as exc:
            oa.embeddings.create(model="minilm", input=bad)
        assert exc.value.body["type"] == "invalid_request_error", bad
    # A model that is no text-embedding model.
    with pytest.raises(openai.BadRequestError) as exc:
        oa.embeddings.create(model="silero_vad", input="hello")
    assert "not a text-embedding model" in exc.value.body["message"]
    r = requests.post(f"{base_url}/v1/embeddings", json={"model": "minilm", "input": "x", "encoding_format": "int8"},
                      timeout=30)
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "code"}
    r = requests.post(f"{base_url}/v1/embeddings", data=b"{", timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_request"
