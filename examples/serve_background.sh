# Sourced by the scripts that drive a `dejavu serve` of their own (examples/real_clients.sh,
# benchmarks/real_clients.sh):
#   serve_background PYTHON LOG PORT [serve flags...]
# starts it, stops it when the script exits, and returns once /health answers; a server that exits
# first (a taken port, a bad flag) fails with its last log line.
serve_background() {
    local py=$1 log=$2 port=$3
    shift 3
    "$py" -m dejavu serve --port "$port" "$@" > "$log" 2>&1 &
    server_pid=$!
    trap 'kill "$server_pid" 2>/dev/null; wait "$server_pid" 2>/dev/null || true' EXIT
    for _ in $(seq 1 "${DEJAVU_SERVE_WAIT:-300}"); do
        curl -sf "http://127.0.0.1:$port/health" >/dev/null && return 0
        kill -0 "$server_pid" 2>/dev/null || { echo "dejavu serve exited: $(tail -1 "$log") (log: $log)" >&2; return 1; }
        sleep 1
    done
    echo "dejavu serve did not answer /health in ${DEJAVU_SERVE_WAIT:-300} s (log: $log)" >&2
    return 1
}
