#!/usr/bin/env bash
# A whole cluster on one machine: RabbitMQ + Redis (private instances in a temp dir, when installed),
# two API nodes and two workers on the demo model. Ctrl-C stops everything it started.
#   API_PORTS (default "7866 7867"), WORKERS (default 2), DEVICE (default cpu).
#   DIFFUSIONAPI_BROKER_URL / DIFFUSIONAPI_REDIS_URL already set: those servers are used instead.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
py=.venv/bin/python
API_PORTS="${API_PORTS:-7866 7867}"
WORKERS="${WORKERS:-2}"
DEVICE="${DEVICE:-cpu}"
run="$(mktemp -d "${TMPDIR:-/tmp}/diffusionapi-cluster.XXXXXX")"
pids=()
rabbit_env=()

free_port() { "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() {  # port, what
  for _ in $(seq 1 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.2
  done
  echo "cluster-demo: $2 did not start (logs in $run)" >&2; exit 1
}
cleanup() {
  trap - EXIT INT TERM
  echo "cluster-demo: stopping" >&2
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ "${#rabbit_env[@]}" -gt 0 ]; then
    env "${rabbit_env[@]}" /usr/lib/rabbitmq/bin/rabbitmqctl -n "$RABBIT_NODE" stop >/dev/null 2>&1 || true
    env "${rabbit_env[@]}" epmd -kill >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT INT TERM

if [ -z "${DIFFUSIONAPI_REDIS_URL:-}" ]; then
  command -v redis-server >/dev/null || { echo "cluster-demo: redis-server not installed (scripts/system-deps.sh)" >&2; exit 1; }
  port="$(free_port)"; mkdir -p "$run/redis"
  redis-server --port "$port" --bind 127.0.0.1 --dir "$run/redis" --appendonly yes --save "" \
    --logfile "$run/redis/redis.log" & pids+=($!)
  wait_port "$port" redis-server
  export DIFFUSIONAPI_REDIS_URL="redis://127.0.0.1:$port/0"
fi
if [ -z "${DIFFUSIONAPI_BROKER_URL:-}" ]; then
  [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || { echo "cluster-demo: rabbitmq-server not installed (scripts/system-deps.sh)" >&2; exit 1; }
  port="$(free_port)"; RABBIT_NODE="demo$$@localhost"; mkdir -p "$run/rabbitmq"; echo "[]." > "$run/rabbitmq/plugins"
  rabbit_env=(HOME="$run/rabbitmq" RABBITMQ_NODENAME="$RABBIT_NODE" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
              RABBITMQ_NODE_PORT="$port" RABBITMQ_DIST_PORT="$(free_port)" ERL_EPMD_PORT="$(free_port)"
              RABBITMQ_MNESIA_BASE="$run/rabbitmq/mnesia" RABBITMQ_LOG_BASE="$run/rabbitmq/log"
              RABBITMQ_ENABLED_PLUGINS_FILE="$run/rabbitmq/plugins" RABBITMQ_CONFIG_FILE="$run/rabbitmq/rabbitmq")
  env "${rabbit_env[@]}" /usr/lib/rabbitmq/bin/rabbitmq-server > "$run/rabbitmq/stdout.log" 2>&1 & pids+=($!)
  wait_port "$port" rabbitmq-server
  export DIFFUSIONAPI_BROKER_URL="amqp://guest:guest@127.0.0.1:$port//"
fi
export DIFFUSIONAPI_BACKEND=celery

"$py" -m diffusionapi.cli ensure-model
for i in $(seq 1 "$WORKERS"); do
  "$py" -m diffusionapi.jobs.backends.celery.cli worker --device "$DEVICE" --models demo-tiny-sd15 --name "worker-$i" \
    > "$run/worker-$i.log" 2>&1 & pids+=($!)
done
for port in $API_PORTS; do
  "$py" -m diffusionapi.jobs.backends.celery.cli api --host 127.0.0.1 --port "$port" --log-level warning \
    > "$run/api-$port.log" 2>&1 & pids+=($!)
  wait_port "$port" "API node on $port"
done
echo "cluster-demo: broker $DIFFUSIONAPI_BROKER_URL, redis $DIFFUSIONAPI_REDIS_URL, logs in $run"
for port in $API_PORTS; do echo "cluster-demo: API node http://127.0.0.1:$port  (GET /cluster shows the workers)"; done
wait -n "${pids[@]}" || true
echo "cluster-demo: a process exited (logs in $run)" >&2
