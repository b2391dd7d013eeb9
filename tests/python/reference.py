"""Inputs built the way real users build them, and the expected outputs computed by
running the same ONNX files with Python onnxruntime (the reference the server must match).
"""

import functools
import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"

RTOL = 1e-4
ATOL = 1e-4


@functools.lru_cache(maxsize=None)
def session(model: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(MODELS / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])


# --- magika ---------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def magika_config() -> dict:
    return json.loads((MODELS / "magika" / "magika_config.json").read_text())


def magika_labels() -> list:
    return magika_config()["target_labels_space"]


def magika_features(path) -> np.ndarray:
    """Magika's v3 features: the first `beg_size` bytes of the whitespace-lstripped
    first block and the last `end_size` bytes of the rstripped last block, padded
    with the padding token (256) on the outer side of each half."""
    cfg = magika_config()
    beg_size, end_size, block, pad = cfg["beg_size"], cfg["end_size"], cfg["block_size"], cfg["padding_token"]
    assert cfg["mid_size"] == 0
    data = Path(path).read_bytes()
    beg = data[:block].lstrip()[:beg_size]
    end = data[-block:].rstrip()[-end_size:] if data else b""
    feats = list(beg) + [pad] * (beg_size - len(beg)) + [pad] * (end_size - len(end)) + list(end)
    return np.asarray(feats, dtype=np.int32)


# Real files on every machine this runs on, with the label magika gives them
# (checked with onnxruntime: each with > 0.99 probability).
MAGIKA_FILES = {
    "/bin/ls": "elf",
    os.__file__: "python",  # the stdlib's os.py
    str(ROOT / "scripts" / "setup.sh"): "shell",
}


def magika_real_batch():
    paths = list(MAGIKA_FILES)
    return paths, np.stack([magika_features(p) for p in paths])


def magika_random_batch(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 2048), dtype=np.int32)


def magika_ref(x: np.ndarray) -> np.ndarray:
    return session("magika").run(["target_label"], {"bytes": x})[0]


# --- minilm -----------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def tokenizer() -> Tokenizer:
    tok = Tokenizer.from_file(str(MODELS / "minilm" / "tokenizer.json"))
    # The shipped file pads every item to 128; pad a batch to its longest item instead,
    # which is what the server does (and what it must be compared with).
    tok.no_truncation()
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    return tok


def minilm_tokens(texts):
    enc = tokenizer().encode_batch(list(texts))
    ids = np.array([e.ids for e in enc], dtype=np.int64)
    mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
    return ids, mask


def minilm_ref(texts) -> np.ndarray:
    """sentence-transformers' embedding: mean over real tokens, then L2-normalised."""
    ids, mask = minilm_tokens(texts)
    hidden = session("minilm").run(
        ["last_hidden_state"],
        {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)},
    )[0]
    m = mask[..., None].astype(np.float32)
    pooled = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# --- silero_vad -------------------------------------------------------------------

def vad_chunk(seed: int = 0) -> np.ndarray:
    """576 samples at 16 kHz (64 context + 512 new): a 440 Hz tone with some noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(576) / 16000.0
    x = 0.5 * np.sin(2 * np.pi * 440.0 * t) + 0.05 * rng.standard_normal(576)
    return x.astype(np.float32).reshape(1, 576)


def vad_ref(chunk: np.ndarray, state: np.ndarray, sr: int = 16000):
    out, state_n = session("silero_vad").run(
        ["output", "stateN"], {"input": chunk, "state": state, "sr": np.array(sr, dtype=np.int64)}
    )
    return out, state_n
