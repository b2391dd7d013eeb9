"""Flask peer for `lattice bench`: run with gunicorn (sync workers), see run_peer.sh."""
from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

import model_cfg

app = Flask(__name__)


# The models are loaded when a worker imports model_cfg, so a worker that answers is ready.
@app.get("/v2/health/live")
@app.get("/v2/health/ready")
def ready():
    return "", 200


@app.post("/v2/models/<model_name>/infer")
def infer(model_name):
    body = request.get_json(force=True)  # invalid JSON raises a 400 handled below
    try:
        return jsonify(model_cfg.run(model_name, body))
    except model_cfg.InferError as e:
        return jsonify(error=str(e)), e.status


@app.errorhandler(HTTPException)
def http_error(e):
    # JSON instead of werkzeug's HTML error pages.
    return jsonify(error=e.description), e.code
