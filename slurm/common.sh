# shellcheck shell=bash
# Shared logic of the slurm/*.sh job scripts (sourced by them, never run on its own).
#
# A job script sets its defaults (AAPO_CONFIG, AAPO_ROLLOUT_NODES) and calls `aapo_train_main "$@"`, which:
#   1. activates the venv (or prepares the container wrapper) and cd's to the repository;
#   2. resolves the config with the overrides (fails fast, naming the bad key, before any srun);
#   3. optionally starts `aapo-rollout-server` (policy, reference) on the last AAPO_ROLLOUT_NODES nodes (the
#      trainer starts while they load, and waits for them when it connects);
#   4. srun's one `aapo-train` rank per GPU (per task on CPU) with `--resume auto`; distributed init reads
#      Slurm's variables (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID) plus MASTER_ADDR/MASTER_PORT set here;
#   5. forwards USR1/TERM that reach the batch shell to the trainer step, so `--signal=B:USR1@300` and
#      `scancel --batch --signal=USR1` work as well as the default `--signal=USR1@300` (sent to the steps);
#   6. on trainer exit code 3 ("stopped by signal, checkpoint saved") requeues the job with
#      `scontrol requeue`; the requeued run resumes from the checkpoint through `--resume auto`.
#
# Environment overrides (all optional):
#   AAPO_HOME            repository root (default: the directory holding slurm/)
#   AAPO_CONFIG          config YAML, absolute or relative to AAPO_HOME (default: set by the job script)
#   AAPO_RUN_DIR         run directory            -> --set trainer.run_dir=...
#   AAPO_CKPT_DIR        checkpoint directory     -> --set checkpoint.dir=...
#   AAPO_EXTRA_ARGS      more trainer arguments, split on whitespace ("--set trainer.steps=3 --set ...");
#                        arguments given to the job script itself (sbatch script.sh --set k=v) are appended too
#   AAPO_RESUME          auto (default) | none | a checkpoint directory -> --resume ...
#   AAPO_REQUEUE         1 (default): requeue the job when the trainer stops on a signal (exit 3); 0: never
#   AAPO_MAX_REQUEUES    give up requeueing after this many restarts of the job (default 50)
#   AAPO_VENV            virtualenv to activate (default: $AAPO_HOME/.venv when it exists)
#   AAPO_CONTAINER       container image every srun task runs in (the batch shell stays on the host)
#   AAPO_CONTAINER_RUNTIME  pyxis (default: srun --container-image) | apptainer (apptainer exec --nv IMAGE)
#   AAPO_CONTAINER_MOUNTS   comma-separated SRC:DST bind mounts (default: AAPO_HOME:AAPO_HOME)
#   AAPO_TRAIN_CMD       trainer command, split on whitespace (default: aapo-train)
#   AAPO_SRUN_ARGS       extra srun arguments for the trainer step (split on whitespace)
#   AAPO_SRUN_WAIT       seconds the other ranks may keep running once one rank has exited (default 600)
#   AAPO_ROLLOUT_PLACEMENT  colocated | server: overrides the config's rollout.placement
#   AAPO_ROLLOUT_NODES   with placement=server: 2 = the last two nodes of this job run aapo-rollout-server
#                        (one for the policy engine, one for the frozen reference engine) and the trainer is
#                        pointed at them; 1 = both servers on the last node, each on half its GPUs (CPUs), the
#                        reference on AAPO_ROLLOUT_PORT + 1; 0 = the servers run elsewhere, at the config's
#                        rollout.server_url and rollout.reference_server_url
#   AAPO_ROLLOUT_MODEL   HF directory the in-job servers load (default: model.path or model.tokenizer of the
#                        config, whichever holds config.json + safetensors)
#   AAPO_ROLLOUT_PORT    port of the in-job servers (default 8000; one rollout node: the reference's is the next)
#   AAPO_ROLLOUT_MEMORY_FRACTION  vLLM memory share on a server node (default 0.85)
#   AAPO_ROLLOUT_SERVER_ARGS  extra aapo-rollout-server arguments (split on whitespace)
#   AAPO_ROLLOUT_WAIT_S  seconds to wait for the in-job servers to answer /health (default 1800); the trainer
#                        starts at the same time and waits as long for them when it connects
#   AAPO_ROLLOUT_TOKEN   bearer token shared by the in-job servers and the trainer (default: random per job;
#                        the variable is the config's rollout.token_env)
#   AAPO_DRY_RUN         1: print the resolved layout and the srun commands instead of running them
#   MASTER_ADDR, MASTER_PORT  rendezvous (default: first training host; 20000 + a hash of job id and restart)
#   OMP_NUM_THREADS      default: the CPUs of one task

AAPO_EXIT_STOPPED=3   # the trainer's "stopped by signal, checkpoint saved" exit code

# Every srun task runs under slurm/signal_shield.py. Slurm delivers SIGUSR1 to every process of a step, and
# the trainer's helper processes (vLLM engine core and workers, reward workers) would die of it. The shield
# blocks SIGUSR1 for the whole process tree and hands it to the trainer's own Python handler through a
# watcher thread. A signal that arrives before the handler exists is held until it does.
AAPO_TASK_WRAPPER=(python3 "$AAPO_HOME/slurm/signal_shield.py")

# shellcheck source=slurm/rollout_servers.sh
source "$AAPO_HOME/slurm/rollout_servers.sh"

aapo_log() { printf '[aapo %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
aapo_die() { aapo_log "error: $*"; exit 2; }

# Split a whitespace-separated string into the array named $1 (no quoting: values cannot contain spaces).
aapo_split() {
    local -n _out=$1
    _out=()
    if [ -n "${2:-}" ]; then
        read -r -a _out <<< "$2"
    fi
}

# Expand a Slurm host list ("node[01-03],gpu7") into one host per line.
aapo_hostnames() {
    if command -v scontrol > /dev/null 2>&1 && scontrol show hostnames "$1" 2> /dev/null; then
        return 0
    fi
    # No scontrol (dry runs off-cluster): accept a plain comma-separated list.
    tr ',' '\n' <<< "$1"
}

# GPUs per node of this allocation: SLURM_GPUS_ON_NODE, else the count in SLURM_GPUS_PER_NODE ("8", "h100:8").
aapo_gpus_per_node() {
    local g=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}
    g=${g##*:}
    g=${g%%(*}
    case "$g" in '' | *[!0-9]*) g=0 ;; esac
    echo "$g"
}

# Activate the venv (host side; inside a container the image's environment is used as is).
aapo_activate() {
    local venv=${AAPO_VENV:-}
    if [ -z "$venv" ] && [ -z "${AAPO_CONTAINER:-}" ] && [ -d "$AAPO_HOME/.venv" ]; then
        venv=$AAPO_HOME/.venv
    fi
    if [ -n "$venv" ]; then
        [ -x "$venv/bin/python" ] || aapo_die "AAPO_VENV=$venv is not a virtualenv (no bin/python)"
        export VIRTUAL_ENV=$venv
        export PATH="$venv/bin:$PATH"
        aapo_log "venv: $venv"
    fi
    if [ -n "${AAPO_CONTAINER:-}" ]; then
        case "${AAPO_CONTAINER_RUNTIME:-pyxis}" in
            pyxis | apptainer) ;;
            *) aapo_die "AAPO_CONTAINER_RUNTIME must be pyxis or apptainer, got '${AAPO_CONTAINER_RUNTIME}'" ;;
        esac
        aapo_log "container: $AAPO_CONTAINER (${AAPO_CONTAINER_RUNTIME:-pyxis})"
    fi
}

# srun options (array AAPO_CT_SRUN) and command prefix (array AAPO_CT_PREFIX) that run a task in the container.
aapo_container_wrap() {
    AAPO_CT_SRUN=()
    AAPO_CT_PREFIX=()
    [ -n "${AAPO_CONTAINER:-}" ] || return 0
    local mounts=${AAPO_CONTAINER_MOUNTS:-$AAPO_HOME:$AAPO_HOME}
    if [ "${AAPO_CONTAINER_RUNTIME:-pyxis}" = pyxis ]; then
        AAPO_CT_SRUN=("--container-image=$AAPO_CONTAINER" "--container-mounts=$mounts"
            "--container-workdir=$AAPO_HOME")
    else
        AAPO_CT_PREFIX=(apptainer exec --nv --pwd "$AAPO_HOME")
        local m
        local -a parts
        IFS=',' read -r -a parts <<< "$mounts"
        for m in "${parts[@]}"; do
            AAPO_CT_PREFIX+=(--bind "$m")
        done
        AAPO_CT_PREFIX+=("$AAPO_CONTAINER")
    fi
}

# Print the resolved config values the launcher needs as KEY=VALUE lines (fails with the ConfigError message).
aapo_resolve_config() {
    local python=${AAPO_PYTHON:-python3}
    if [ -n "${VIRTUAL_ENV:-}" ]; then
        python=$VIRTUAL_ENV/bin/python
    fi
    if [ -n "${AAPO_CONTAINER:-}" ] && [ "${AAPO_DRY_RUN:-0}" != 1 ]; then
        # The host may lack the project's Python; resolve inside the image, on one task.
        srun --nodes=1 --ntasks=1 --kill-on-bad-exit=1 "${AAPO_CT_SRUN[@]}" "${AAPO_CT_PREFIX[@]}" \
            python3 "$AAPO_HOME/slurm/resolve_config.py" "$@"
    else
        "$python" "$AAPO_HOME/slurm/resolve_config.py" "$@"
    fi
}

# Run a command, or print it under AAPO_DRY_RUN=1.
aapo_run_bg() {
    if [ "${AAPO_DRY_RUN:-0}" = 1 ]; then
        printf 'DRY-RUN:'
        printf ' %q' "$@"
        printf '\n'
        AAPO_LAST_PID=
        return 0
    fi
    "$@" &
    AAPO_LAST_PID=$!
}

# Trap handler for USR1/TERM/INT reaching the batch shell: remember the stop request; aapo_wait_trainer passes
# it on to the trainer step as SIGUSR1 (srun hard-kills its tasks on SIGTERM, so TERM is translated into the
# trainer's own save-and-stop signal).
aapo_on_signal() {
    if [ "${AAPO_STOP_REQUESTED:-0}" = 0 ]; then
        aapo_log "batch shell received SIG$1: the trainer will save a checkpoint and stop (SIGUSR1)"
    fi
    AAPO_STOP_REQUESTED=1
}

# Wait for the trainer step (srun pid AAPO_TRAIN_PID) to exit and set AAPO_TRAIN_RC. Once a stop was requested,
# send the step SIGUSR1 now and again every AAPO_SIGNAL_RESEND_S seconds (default 15): a signal that arrives
# while srun is still starting its tasks would otherwise be lost. The trainer treats repeats as one request.
aapo_wait_trainer() {
    local next_send=0 rc=0
    while kill -0 "$AAPO_TRAIN_PID" 2> /dev/null; do
        if [ "${AAPO_STOP_REQUESTED:-0}" = 1 ] && ((SECONDS >= next_send)); then
            kill -s USR1 "$AAPO_TRAIN_PID" 2> /dev/null || true
            next_send=$((SECONDS + ${AAPO_SIGNAL_RESEND_S:-15}))
        fi
        sleep 1 &
        wait $! 2> /dev/null || true # returns early when a trapped signal arrives
    done
    wait "$AAPO_TRAIN_PID" || rc=$?
    AAPO_TRAIN_RC=$rc
}

# The whole job: layout, optional rollout servers, the trainer step, requeue. Arguments go to the trainer.
aapo_train_main() {
    # Signals first: an unhandled USR1 would kill the batch shell (and with it the job).
    AAPO_STOP_REQUESTED=0
    trap 'aapo_on_signal USR1' USR1
    trap 'aapo_on_signal TERM' TERM
    trap 'aapo_on_signal INT' INT
    [ -n "${SLURM_JOB_ID:-}" ] || [ "${AAPO_DRY_RUN:-0}" = 1 ] ||
        aapo_die "not inside a Slurm job: submit with sbatch (or set AAPO_DRY_RUN=1 to print the commands)"
    cd "$AAPO_HOME" || aapo_die "AAPO_HOME=$AAPO_HOME is not a directory"
    aapo_activate
    aapo_container_wrap

    local config=${AAPO_CONFIG:?AAPO_CONFIG is not set}
    [ -f "$config" ] || aapo_die "config file not found: $config (AAPO_CONFIG, relative to $AAPO_HOME)"

    # ---- trainer arguments
    local -a extra script_args=("$@") args
    aapo_split extra "${AAPO_EXTRA_ARGS:-}"
    args=(--config "$config")
    [ -z "${AAPO_RUN_DIR:-}" ] || args+=(--set "trainer.run_dir=$AAPO_RUN_DIR")
    [ -z "${AAPO_CKPT_DIR:-}" ] || args+=(--set "checkpoint.dir=$AAPO_CKPT_DIR")
    [ -z "${AAPO_ROLLOUT_PLACEMENT:-}" ] || args+=(--set "rollout.placement=$AAPO_ROLLOUT_PLACEMENT")
    args+=("${extra[@]}" "${script_args[@]}")

    # ---- layout: nodes, ranks per node, rollout nodes
    local -a hosts train_hosts rollout_hosts
    mapfile -t hosts < <(aapo_hostnames "${SLURM_JOB_NODELIST:-$(hostname -s)}")
    local nnodes=${#hosts[@]}
    local gpn
    gpn=$(aapo_gpus_per_node)
    local ntasks=${SLURM_NTASKS:-1}

    # In-job servers (if the placement turns out to be server) are at addresses known now: the config is
    # checked with them, as the trainer will run with them.
    local -a server_sets=()
    if [ "${AAPO_ROLLOUT_NODES:-0}" -gt 0 ] && [ "${AAPO_ROLLOUT_NODES:-0}" -lt "$nnodes" ]; then
        aapo_server_addrs "${hosts[@]:nnodes-AAPO_ROLLOUT_NODES}"
        server_sets=(--set "rollout.server_url=http://${AAPO_POLICY_ADDR}"
            --set "rollout.reference_server_url=http://${AAPO_REFERENCE_ADDR}")
    fi

    local -A cfg=()
    local key value resolved
    resolved=$(aapo_resolve_config "${args[@]}" "${server_sets[@]}") ||
        aapo_die "the configuration is invalid (see above)"
    while IFS='=' read -r key value; do
        [ -n "$key" ] && cfg[$key]=$value
    done <<< "$resolved"

    local rollout_nodes=0
    if [ "${cfg[placement]}" = server ] && [ "${AAPO_ROLLOUT_NODES:-0}" -gt 0 ]; then
        rollout_nodes=$AAPO_ROLLOUT_NODES
        ((rollout_nodes < nnodes)) ||
            aapo_die "AAPO_ROLLOUT_NODES=$rollout_nodes leaves no training node in a $nnodes-node job"
    elif [ "${AAPO_ROLLOUT_NODES:-0}" -gt 0 ]; then
        aapo_log "rollout.placement=${cfg[placement]}: ignoring AAPO_ROLLOUT_NODES=$AAPO_ROLLOUT_NODES"
    fi
    local train_nodes=$((nnodes - rollout_nodes))
    train_hosts=("${hosts[@]:0:train_nodes}")
    rollout_hosts=("${hosts[@]:train_nodes}")

    local per_node
    if ((gpn > 0)); then
        per_node=$gpn # one rank per GPU
    else
        ((ntasks % nnodes == 0)) || aapo_die "--ntasks=$ntasks is not a multiple of the $nnodes nodes"
        per_node=$((ntasks / nnodes))
    fi
    local world=$((per_node * train_nodes))
    local cpus_node=${SLURM_CPUS_ON_NODE:-1}
    local cpt=$((cpus_node / per_node))
    ((cpt >= 1)) || cpt=1
    local tp=${cfg[tp]} pp=${cfg[pp]}
    ((world % (tp * pp) == 0)) ||
        aapo_die "world size $world ($train_nodes nodes x $per_node ranks) is not a multiple of" \
            "TP*PP = $tp*$pp from $config"

    export MASTER_ADDR=${MASTER_ADDR:-${train_hosts[0]}}
    if [ -z "${MASTER_PORT:-}" ]; then
        # A fresh port per restart: the previous incarnation's sockets may still linger in TIME_WAIT.
        MASTER_PORT=$((20000 + (${SLURM_JOB_ID:-0} * 7 + ${SLURM_RESTART_COUNT:-0}) % 20000))
        export MASTER_PORT
    fi
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$cpt}

    aapo_log "job ${SLURM_JOB_ID:-dry-run} restart ${SLURM_RESTART_COUNT:-0}: config $config," \
        "$train_nodes training node(s) x $per_node rank(s) = world $world (TP $tp, PP $pp)," \
        "GPUs/node $gpn, CPUs/rank $cpt, master $MASTER_ADDR:$MASTER_PORT"
    aapo_log "run dir ${cfg[run_dir]}, checkpoints ${cfg[ckpt_dir]}, rollout placement ${cfg[placement]}" \
        "${rollout_hosts[*]:+(servers on ${rollout_hosts[*]})}"

    local resume=${AAPO_RESUME:-auto}
    [ "$resume" = none ] || args+=(--resume "$resume")

    AAPO_SERVER_PIDS=()
    # ---- in-job rollout servers
    if ((rollout_nodes > 0)); then
        local hf_model=${AAPO_ROLLOUT_MODEL:-${cfg[hf_model]}}
        [ -n "$hf_model" ] || aapo_die "the in-job rollout servers need the starting model's HF weights:" \
            "set AAPO_ROLLOUT_MODEL (neither model.path nor model.tokenizer of $config holds config.json +" \
            "safetensors)"
        AAPO_SERVER_ARGS=(--model "$hf_model" --host 0.0.0.0)
        AAPO_SERVER_ENGINE_ARGS=(--dtype "${cfg[rollout_dtype]}" --max-model-len "${cfg[max_model_len]}"
            --seed "${cfg[rollout_seed]}" --token-env "${cfg[token_env]}" --logprobs-mode "${cfg[logprobs_mode]}"
            --memory-fraction "${AAPO_ROLLOUT_MEMORY_FRACTION:-0.85}")
        aapo_start_servers "${cfg[token_env]}" "${rollout_hosts[@]}"
        args+=("${server_sets[@]}")
    fi

    # ---- the trainer step
    local -a srun_extra train_cmd
    aapo_split srun_extra "${AAPO_SRUN_ARGS:-}"
    aapo_split train_cmd "${AAPO_TRAIN_CMD:-aapo-train}"
    local -a srun_cmd=(srun --nodes="$train_nodes" --ntasks="$world" --ntasks-per-node="$per_node"
        --cpus-per-task="$cpt" --kill-on-bad-exit=0 --wait="${AAPO_SRUN_WAIT:-600}"
        --label --unbuffered)
    ((rollout_nodes == 0)) || srun_cmd+=(--nodelist="$(
        IFS=,
        echo "${train_hosts[*]}"
    )")
    srun_cmd+=("${AAPO_CT_SRUN[@]}" "${srun_extra[@]}"
        "${AAPO_CT_PREFIX[@]}" "${AAPO_TASK_WRAPPER[@]}" "${train_cmd[@]}" "${args[@]}")

    local rc
    if [ "$AAPO_STOP_REQUESTED" = 1 ]; then
        aapo_log "stop requested before the trainer started: not starting it"
        rc=$AAPO_EXIT_STOPPED
    else
        aapo_run_bg "${srun_cmd[@]}"
        [ "${AAPO_DRY_RUN:-0}" = 1 ] && return 0
        AAPO_TRAIN_PID=$AAPO_LAST_PID
        ((rollout_nodes == 0)) || aapo_wait_servers
        aapo_wait_trainer
        rc=$AAPO_TRAIN_RC
    fi
    aapo_stop_servers

    case "$rc" in
        0)
            aapo_log "training finished (exit 0)"
            return 0
            ;;
        "$AAPO_EXIT_STOPPED")
            aapo_log "trainer stopped on a signal after saving a checkpoint (exit $rc)"
            aapo_requeue
            return "$rc"
            ;;
        *)
            aapo_log "trainer failed (exit $rc); not requeueing"
            return "$rc"
            ;;
    esac
}

# Requeue this job so it resumes from the checkpoint (--resume auto), unless disabled or over the limit.
aapo_requeue() {
    local restarts=${SLURM_RESTART_COUNT:-0} max=${AAPO_MAX_REQUEUES:-50}
    if [ "${AAPO_REQUEUE:-1}" != 1 ]; then
        aapo_log "AAPO_REQUEUE=${AAPO_REQUEUE}: not requeueing; resubmit the same command to resume"
    elif ((restarts >= max)); then
        aapo_log "job already restarted $restarts times (AAPO_MAX_REQUEUES=$max): not requeueing"
    else
        aapo_log "requeueing job $SLURM_JOB_ID (restart $((restarts + 1))); it resumes from the latest checkpoint"
        # Slurm ends this batch shell as part of the requeue; nothing after this line is guaranteed to run.
        scontrol requeue "$SLURM_JOB_ID" || aapo_log "scontrol requeue $SLURM_JOB_ID failed; resubmit to resume"
    fi
}

# The conversion job (slurm/convert_hf.sh): `aapo-convert hf-to-mcore` as one srun task on one node.
# Arguments: HF_DIR OUT_DIR [more aapo-convert options], or AAPO_HF_DIR / AAPO_OUT with only options.
aapo_convert_main() {
    [ -n "${SLURM_JOB_ID:-}" ] || [ "${AAPO_DRY_RUN:-0}" = 1 ] ||
        aapo_die "not inside a Slurm job: submit with sbatch (or set AAPO_DRY_RUN=1 to print the command)"
    cd "$AAPO_HOME" || aapo_die "AAPO_HOME=$AAPO_HOME is not a directory"
    aapo_activate
    aapo_container_wrap
    local hf=${AAPO_HF_DIR:-} out=${AAPO_OUT:-}
    if [ $# -ge 2 ] && [ "${1#-}" = "$1" ] && [ "${2#-}" = "$2" ]; then
        hf=$1 out=$2
        shift 2
    fi
    if [ -z "$hf" ] || [ -z "$out" ]; then
        aapo_die "usage: sbatch slurm/convert_hf.sh HF_DIR OUT_DIR [aapo-convert options]" \
            "(or set AAPO_HF_DIR and AAPO_OUT); relative paths are relative to $AAPO_HOME"
    fi
    [ -d "$hf" ] || aapo_die "HF checkpoint directory not found: $hf"
    local -a opts=(--no-progress)
    [ -z "${AAPO_CONVERT_WORKERS:-}" ] || opts+=(--workers "$AAPO_CONVERT_WORKERS")
    [ -z "${AAPO_CONVERT_DTYPE:-}" ] || opts+=(--dtype "$AAPO_CONVERT_DTYPE")
    local cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
    aapo_log "converting $hf -> $out on $(hostname -s) with $cpus CPU(s)"
    local rc=0
    aapo_run_bg srun --nodes=1 --ntasks=1 --cpus-per-task="$cpus" --kill-on-bad-exit=1 --unbuffered \
        "${AAPO_CT_SRUN[@]}" "${AAPO_CT_PREFIX[@]}" \
        aapo-convert hf-to-mcore --hf-dir "$hf" --out "$out" "${opts[@]}" "$@"
    [ "${AAPO_DRY_RUN:-0}" = 1 ] && return 0
    wait "$AAPO_LAST_PID" || rc=$?
    if [ "$rc" = 0 ]; then
        aapo_log "conversion finished: set model.path: $out in your config"
    else
        aapo_log "conversion failed (exit $rc); nothing was written to $out"
    fi
    return "$rc"
}
