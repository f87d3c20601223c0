# shellcheck shell=bash
# The in-job rollout servers of slurm/common.sh (sourced by it): start `aapo-rollout-server` for the policy and
# the reference on the job's rollout nodes, wait for their /health while the trainer starts, stop them.

# Start aapo-rollout-server for the policy and the reference, with the arguments in arrays AAPO_SERVER_ARGS
# (--model, --host) and AAPO_SERVER_ENGINE_ARGS (after --port and --tensor-parallel-size), and a bearer token
# shared through the environment variable named $1. Two hosts: the policy on the first, the reference on the
# second, each on the whole node (port AAPO_ROLLOUT_PORT). One host: both on it, each on half of its GPUs (CPUs),
# the reference on the next port.
# Sets AAPO_POLICY_ADDR / AAPO_REFERENCE_ADDR (host:port); aapo_wait_servers waits for them.
aapo_start_servers() {
    local token_env=$1
    shift
    local -a hosts=("$@") server_extra
    ((${#hosts[@]} == 1 || ${#hosts[@]} == 2)) ||
        aapo_die "in-job rollout servers need AAPO_ROLLOUT_NODES=2 (policy + reference) or 1 (both on one" \
            "node), got ${#hosts[@]}"
    if [ -z "${!token_env:-}" ]; then
        printf -v "$token_env" '%s' "$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
    fi
    export "${token_env?}"
    aapo_split server_extra "${AAPO_ROLLOUT_SERVER_ARGS:-}"
    local gpn cpus=${SLURM_CPUS_ON_NODE:-1} role addr
    gpn=$(aapo_gpus_per_node)
    if ((${#hosts[@]} == 1)); then
        ((gpn % 2 == 0)) || aapo_die "both rollout servers on one node need an even GPU count, got $gpn"
        gpn=$((gpn / 2))
        cpus=$((cpus > 1 ? cpus / 2 : 1))
    fi
    aapo_server_addrs "${hosts[@]}"
    for role in policy reference; do
        if [ "$role" = policy ]; then addr=$AAPO_POLICY_ADDR; else addr=$AAPO_REFERENCE_ADDR; fi
        aapo_run_bg srun --nodes=1 --ntasks=1 --nodelist="${addr%:*}" --cpus-per-task="$cpus" \
            --gpus-per-node="$gpn" --kill-on-bad-exit=1 --label --unbuffered \
            "${AAPO_CT_SRUN[@]}" "${AAPO_CT_PREFIX[@]}" "${AAPO_TASK_WRAPPER[@]}" \
            aapo-rollout-server --role "$role" "${AAPO_SERVER_ARGS[@]}" --port "${addr##*:}" \
            --tensor-parallel-size "$((gpn > 0 ? gpn : 1))" "${AAPO_SERVER_ENGINE_ARGS[@]}" "${server_extra[@]}"
        [ -z "$AAPO_LAST_PID" ] || AAPO_SERVER_PIDS+=("$AAPO_LAST_PID")
    done
    # The trainer starts meanwhile and waits this long for the servers when it connects (rollout/client.py).
    export AAPO_ROLLOUT_WAIT_S=${AAPO_ROLLOUT_WAIT_S:-1800}
}

# While the trainer starts: wait until both in-job servers answer /health (the job fails, naming the server,
# if one exits first or takes longer than AAPO_ROLLOUT_WAIT_S).
aapo_wait_servers() {
    aapo_wait_health "$AAPO_POLICY_ADDR" "$AAPO_ROLLOUT_WAIT_S" "${AAPO_SERVER_PIDS[0]}"
    aapo_wait_health "$AAPO_REFERENCE_ADDR" "$AAPO_ROLLOUT_WAIT_S" "${AAPO_SERVER_PIDS[1]}"
}

# Set AAPO_POLICY_ADDR / AAPO_REFERENCE_ADDR (host:port) of the in-job servers on the given rollout hosts:
# two hosts, one server each on AAPO_ROLLOUT_PORT; one host, the reference on the next port.
aapo_server_addrs() {
    local port=${AAPO_ROLLOUT_PORT:-8000}
    AAPO_POLICY_ADDR=$1:$port
    if (($# >= 2)); then AAPO_REFERENCE_ADDR=$2:$port; else AAPO_REFERENCE_ADDR=$1:$((port + 1)); fi
}

# Wait until http://$1/health answers 200, or die after $2 seconds (or when server srun $3 died); returns early
# once a stop was requested or the trainer step ended.
aapo_wait_health() {
    local url=http://$1/health deadline=$((SECONDS + $2)) pid=$3
    local python=${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/}python3
    while ((SECONDS < deadline)); do
        if "$python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" "$url" \
            > /dev/null 2>&1; then
            aapo_log "rollout server $1 is healthy"
            return 0
        fi
        kill -0 "$pid" 2> /dev/null || aapo_die "rollout server for $1 exited before answering $url"
        [ "${AAPO_STOP_REQUESTED:-0}" = 0 ] || return 0
        # The trainer ended already (its exit code decides the job's fate).
        [ -z "${AAPO_TRAIN_PID:-}" ] || kill -0 "$AAPO_TRAIN_PID" 2> /dev/null || return 0
        sleep 5 &
        wait $! 2> /dev/null || true
    done
    aapo_die "rollout server $1 did not answer $url within $2 s (AAPO_ROLLOUT_WAIT_S)"
}

aapo_stop_servers() {
    local pid
    for pid in "${AAPO_SERVER_PIDS[@]}"; do
        kill -s TERM "$pid" 2> /dev/null || true
    done
    for pid in "${AAPO_SERVER_PIDS[@]}"; do
        wait "$pid" 2> /dev/null || true
    done
    AAPO_SERVER_PIDS=()
}
