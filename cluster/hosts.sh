#!/usr/bin/env bash
# A Dask cluster for dmix on several hosts, started by hand with `dask scheduler` and
# `dask worker`: one scheduler, and on every worker host one single-threaded worker process
# per core.
#
#   on the scheduler host:          cluster/hosts.sh scheduler
#   on each worker host:            cluster/hosts.sh worker tcp://SCHEDULER_HOST:8786
#   or all from the scheduler host: cluster/hosts.sh ssh HOST1 HOST2 ...
#   stop what this script started:  cluster/hosts.sh stop [HOST1 HOST2 ...]
#
# Then fit from a machine that can reach the scheduler (better: from the scheduler host, in a
# tmux or batch session, see cluster/README.md "Long fits"):
#
#   $ dmix fit /shared/data.zarr -k 16 --scheduler tcp://SCHEDULER_HOST:8786 --checkpoint /shared/runs/run-1/ckpt --output /shared/runs/run-1/model.zarr
#
# Every host needs the same Python environment (same dmix, dask, zarr) at the same path, and
# the data and the checkpoints must be reachable from every worker and the driver under the
# same path or URL (a shared filesystem, or an fsspec URL such as s3://...).
#
# Settings (environment variables; defaults in brackets):
#   DASK_SCHEDULER_HOST  address the scheduler binds to and advertises [this host's name]
#   DASK_SCHEDULER_PORT  scheduler port, open it to the workers and the driver [8786]
#   DASK_DASHBOARD_PORT  dashboard port (http://SCHEDULER_HOST:PORT/status) [8787]
#   DMIX_NWORKERS        worker processes on this host [all cores: nproc]
#   DMIX_NTHREADS        threads per worker process [1]
#   DMIX_MEMORY_LIMIT    memory per worker process, e.g. 7GiB; "auto" gives each process
#                        total memory / cores [auto]
#   DMIX_INTERFACE       network interface to use, e.g. ib0 [the one of the host name]
#   DMIX_WORKER_PORTS    worker port range for firewalls, e.g. 9000:9063 [random ports]
#   DMIX_NANNY_PORTS     nanny port range for firewalls, e.g. 9100:9163 [random ports]
#   DMIX_LOCAL_DIR       fast local disk for spilling [the system temporary directory]
#   DMIX_RUN_DIR         pid files and logs of this script [$HOME/.dmix-cluster]
#   DASK                 the dask command [dask, from PATH]
set -euo pipefail

DASK=${DASK:-dask}
DASK_SCHEDULER_HOST=${DASK_SCHEDULER_HOST:-$(hostname)}
DASK_SCHEDULER_PORT=${DASK_SCHEDULER_PORT:-8786}
DASK_DASHBOARD_PORT=${DASK_DASHBOARD_PORT:-8787}
DMIX_NTHREADS=${DMIX_NTHREADS:-1}
DMIX_MEMORY_LIMIT=${DMIX_MEMORY_LIMIT:-auto}
DMIX_RUN_DIR=${DMIX_RUN_DIR:-$HOME/.dmix-cluster}

usage() {
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

scheduler() {
    mkdir -p "$DMIX_RUN_DIR"
    local args=(scheduler --host "$DASK_SCHEDULER_HOST" --port "$DASK_SCHEDULER_PORT"
                --dashboard-address ":$DASK_DASHBOARD_PORT"
                --pid-file "$DMIX_RUN_DIR/scheduler.pid"
                --scheduler-file "$DMIX_RUN_DIR/scheduler.json")
    if [[ -n ${DMIX_INTERFACE:-} ]]; then args+=(--interface "$DMIX_INTERFACE"); fi
    echo "dask scheduler on tcp://$DASK_SCHEDULER_HOST:$DASK_SCHEDULER_PORT," \
         "dashboard http://$DASK_SCHEDULER_HOST:$DASK_DASHBOARD_PORT/status" >&2
    exec "$DASK" "${args[@]}"
}

worker() {
    local address=${1:-tcp://$DASK_SCHEDULER_HOST:$DASK_SCHEDULER_PORT}
    local nworkers=${DMIX_NWORKERS:-$(nproc)}
    mkdir -p "$DMIX_RUN_DIR"
    # One single-threaded process per core: the E-step's matrix products run in one BLAS
    # thread each (the nanny sets OMP_NUM_THREADS=1) and the blocks run in parallel.
    local args=(worker "$address" --nworkers "$nworkers" --nthreads "$DMIX_NTHREADS"
                --memory-limit "$DMIX_MEMORY_LIMIT" --death-timeout 120
                --pid-file "$DMIX_RUN_DIR/worker-$(hostname).pid")
    if [[ -n ${DMIX_INTERFACE:-} ]]; then args+=(--interface "$DMIX_INTERFACE"); fi
    if [[ -n ${DMIX_WORKER_PORTS:-} ]]; then args+=(--worker-port "$DMIX_WORKER_PORTS"); fi
    if [[ -n ${DMIX_NANNY_PORTS:-} ]]; then args+=(--nanny-port "$DMIX_NANNY_PORTS"); fi
    if [[ -n ${DMIX_LOCAL_DIR:-} ]]; then args+=(--local-directory "$DMIX_LOCAL_DIR"); fi
    echo "dask worker on $(hostname): $nworkers process(es) x $DMIX_NTHREADS thread(s)," \
         "memory limit $DMIX_MEMORY_LIMIT each, scheduler $address" >&2
    exec "$DASK" "${args[@]}"
}

ssh_cluster() {
    (( $# > 0 )) || usage
    mkdir -p "$DMIX_RUN_DIR"
    local here script address=tcp://$DASK_SCHEDULER_HOST:$DASK_SCHEDULER_PORT
    here=$(cd "$(dirname "$0")" && pwd)
    script="$here/$(basename "$0")"
    nohup "$script" scheduler >"$DMIX_RUN_DIR/scheduler.log" 2>&1 &
    echo "scheduler: log $DMIX_RUN_DIR/scheduler.log" >&2
    local host
    for host in "$@"; do
        # The same path on every host; the settings above travel with the command.
        # shellcheck disable=SC2029
        ssh "$host" "cd $(printf %q "$PWD") && \
            DASK=$(printf %q "$(command -v "$DASK")") \
            DMIX_NWORKERS=${DMIX_NWORKERS:-} DMIX_NTHREADS=$DMIX_NTHREADS \
            DMIX_MEMORY_LIMIT=$DMIX_MEMORY_LIMIT DMIX_INTERFACE=${DMIX_INTERFACE:-} \
            DMIX_WORKER_PORTS=${DMIX_WORKER_PORTS:-} DMIX_NANNY_PORTS=${DMIX_NANNY_PORTS:-} \
            DMIX_LOCAL_DIR=${DMIX_LOCAL_DIR:-} DMIX_RUN_DIR=$(printf %q "$DMIX_RUN_DIR") \
            nohup $(printf %q "$script") worker $address \
            >$(printf %q "$DMIX_RUN_DIR")/worker-$host.log 2>&1 </dev/null &"
        echo "workers on $host: log $DMIX_RUN_DIR/worker-$host.log (on $host)" >&2
    done
    echo "scheduler address: $address" >&2
}

stop() {
    local pidfile host
    for host in "$@"; do
        # shellcheck disable=SC2029
        ssh "$host" "for f in $(printf %q "$DMIX_RUN_DIR")/worker-*.pid; do \
            [ -f \"\$f\" ] && kill -TERM \$(cat \"\$f\") 2>/dev/null; rm -f \"\$f\"; done" || true
    done
    for pidfile in "$DMIX_RUN_DIR"/worker-*.pid "$DMIX_RUN_DIR"/scheduler.pid; do
        [[ -f $pidfile ]] || continue
        kill -TERM "$(cat "$pidfile")" 2>/dev/null || true
        rm -f "$pidfile"
    done
}

case ${1:-} in
    scheduler) shift; scheduler "$@" ;;
    worker) shift; worker "$@" ;;
    ssh) shift; ssh_cluster "$@" ;;
    stop) shift; stop "$@" ;;
    *) usage ;;
esac
