#!/usr/bin/env bash
# Interoperability suite: Python grpcio, an independent gRPC implementation, against the real
# listen-svc and pusher-svc binaries (compression, Session half-close, paging under default
# client limits, health Watch, reflection, errors).
#
#   tests/interop/run.sh                      # builds the services (debug), runs every test
#   tests/interop/run.sh --bin-dir DIR        # uses DIR/listen-svc and DIR/pusher-svc as they are
#   tests/interop/run.sh -- -k session -x     # anything after -- goes to pytest
#
# The virtual environment is target/interop-venv (made once, refreshed when requirements.txt
# changes; INTEROP_VENV moves it); stubs are generated from proto/ into target/interop-stubs
# on every run. Anything missing fails the run; no test is ever skipped.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"

bin_dir=""
pytest_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --bin-dir) bin_dir=${2:?--bin-dir needs a directory}; shift 2 ;;
        --) shift; pytest_args=("$@"); break ;;
        -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "interop: unknown argument $1 (see --help)" >&2; exit 64 ;;
    esac
done

fail() { echo "interop: $*" >&2; exit 1; }

python=${PYTHON:-python3}
command -v "$python" >/dev/null || fail "$python not found: install Python 3.10 or later (Debian: python3, python3-venv)"
requirements=tests/interop/requirements.txt
venv=${INTEROP_VENV:-$root/target/interop-venv}
stamp="$venv/requirements.installed"

# A venv whose interpreter no longer runs (Python upgraded or moved) is made again.
if [ -x "$venv/bin/python" ] && ! "$venv/bin/python" -c 'import sys' 2>/dev/null; then
    rm -rf "$venv"
fi
if [ ! -x "$venv/bin/python" ]; then
    echo "interop: creating $venv"
    "$python" -m venv "$venv" || fail "cannot create a virtual environment with $python -m venv (Debian: apt-get install python3-venv)"
fi
if ! cmp -s "$requirements" "$stamp"; then
    echo "interop: installing $requirements"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --require-virtualenv \
        -r "$requirements" || fail "pip could not install $requirements"
    cp "$requirements" "$stamp"
fi

# Stubs for both services, from the same .proto files the servers are built from.
stubs="$root/target/interop-stubs"
rm -rf "$stubs"
mkdir -p "$stubs"
"$venv/bin/python" -m grpc_tools.protoc -I proto --python_out="$stubs" --grpc_python_out="$stubs" \
    proto/listen/v1/listen.proto proto/pusher/v1/pusher.proto || fail "generating Python stubs from proto/ failed"

if [ -z "$bin_dir" ]; then
    echo "interop: building listen-svc and pusher-svc"
    "${CARGO:-cargo}" build --locked -p listen-svc -p pusher-svc || fail "building the services failed"
    bin_dir=target/debug
fi
for bin in listen-svc pusher-svc; do
    [ -x "$bin_dir/$bin" ] || fail "$bin_dir/$bin is missing (build it, or pass --bin-dir)"
done
bin_dir=$(cd "$bin_dir" && pwd)

echo "interop: grpcio $("$venv/bin/python" -c 'import grpc; print(grpc.__version__)') against $bin_dir"
# No bytecode or pytest cache in the source tree; the services' logs go to pytest's temp dirs.
export PYTHONDONTWRITEBYTECODE=1
INTEROP_BIN_DIR="$bin_dir" INTEROP_STUBS="$stubs" PYTHONPATH="$stubs" \
    "$venv/bin/python" -m pytest -c tests/interop/pytest.ini tests/interop "${pytest_args[@]}"
