"""Model loading and inference shared by the Python peer servers of `lattice bench`.

Each worker process imports this module once and so gets its own ONNX Runtime session
per served model. MODEL picks the models ("magika", "minilm", "silero_vad" or "all"),
ORT_THREADS the intra-op threads of each session (default 1).
"""
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, RuntimeException
from tokenizers import Tokenizer

MODELS_DIR = Path(os.environ.get("MODELS_DIR", Path(__file__).resolve().parents[2] / "models"))
MAX_TEXT_LEN = 128

# Outputs each model offers; all of them are returned when a request names none.
# minilm's `embedding` is computed here from last_hidden_state, not by the ONNX graph.
OUTPUTS = {
    "magika": ["target_label"],
    "minilm": ["embedding", "last_hidden_state"],
    "silero_vad": ["output", "stateN"],
}
DTYPES = {"INT32": np.int32, "INT64": np.int64, "FP32": np.float32, "BYTES": object}
WIRE_DTYPES = {np.dtype(np.float32): "FP32", np.dtype(np.int32): "INT32", np.dtype(np.int64): "INT64"}


class InferError(Exception):
    """A request the server cannot run; `status` is the HTTP status to answer with."""

    status = 400


class ModelNotFound(InferError):
    status = 404


def _session(name):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(os.environ.get("ORT_THREADS", "1"))
    opts.inter_op_num_threads = 1
    path = MODELS_DIR / name / "1" / "model.onnx"
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _tokenizer():
    tok = Tokenizer.from_file(str(MODELS_DIR / "minilm" / "tokenizer.json"))
    # tokenizer.json ships with fixed padding to 128; pad to the longest item of the
    # request instead, as the Lattice server does.
    tok.enable_padding()
    tok.enable_truncation(MAX_TEXT_LEN)
    return tok


_wanted = os.environ.get("MODEL", "all")
_names = list(OUTPUTS) if _wanted == "all" else [_wanted]
if any(n not in OUTPUTS for n in _names):
    raise SystemExit(f"MODEL={_wanted!r}: expected one of {list(OUTPUTS)} or 'all'")
SESSIONS = {name: _session(name) for name in _names}
TOKENIZER = _tokenizer() if "minilm" in SESSIONS else None


def _tensor(t):
    arr = np.asarray(t["data"], dtype=DTYPES[t["datatype"]])
    return arr.reshape(t["shape"])


def _minilm_feeds(feeds):
    if "TEXT" in feeds:
        texts = [s.decode() if isinstance(s, bytes) else str(s) for s in feeds.pop("TEXT").ravel()]
        enc = TOKENIZER.encode_batch(texts)
        feeds["input_ids"] = np.array([e.ids for e in enc], dtype=np.int64)
        feeds["attention_mask"] = np.array([e.attention_mask for e in enc], dtype=np.int64)
        feeds["token_type_ids"] = np.array([e.type_ids for e in enc], dtype=np.int64)
    if "token_type_ids" not in feeds:
        feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
    return feeds


def _mean_pool(hidden, mask):
    """sentence-transformers' mean pooling over the attention mask, then L2 normalisation."""
    m = mask[..., None].astype(np.float32)
    emb = (hidden * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)
    return emb / np.clip(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12, None)


def run(model_name, req):
    """Run one KServe V2 JSON infer request and return the response as a dict."""
    sess = SESSIONS.get(model_name)
    if sess is None:
        raise ModelNotFound(f"unknown model '{model_name}'")
    try:
        feeds = {t["name"]: _tensor(t) for t in req["inputs"]}
        wanted = [o["name"] for o in req.get("outputs") or []] or OUTPUTS[model_name]
        if model_name == "minilm":
            feeds = _minilm_feeds(feeds)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise InferError(f"malformed request: {type(e).__name__}: {e}") from e
    unknown = [n for n in wanted if n not in OUTPUTS[model_name]]
    if unknown:
        raise InferError(f"unknown outputs {unknown} for model '{model_name}'")

    # Shape, dtype or missing-input mistakes surface from ONNX Runtime: the client's fault.
    try:
        if model_name == "minilm":
            (hidden,) = sess.run(["last_hidden_state"], feeds)
            results = {"last_hidden_state": hidden}
            if "embedding" in wanted:
                results["embedding"] = _mean_pool(hidden, feeds["attention_mask"])
        else:
            results = dict(zip(wanted, sess.run(wanted, feeds)))
    except (InvalidArgument, Fail, RuntimeException, ValueError) as e:
        raise InferError(str(e)) from e

    resp = {
        "model_name": model_name,
        "model_version": "1",
        "outputs": [
            {
                "name": name,
                "datatype": WIRE_DTYPES[results[name].dtype],
                "shape": list(results[name].shape),
                "data": results[name].ravel().tolist(),
            }
            for name in wanted
        ],
    }
    if req.get("id") is not None:
        resp["id"] = req["id"]
    return resp
