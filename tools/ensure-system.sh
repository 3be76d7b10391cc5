#!/bin/sh
# Make sure the system pieces the tests and the demo need are present and running:
# python3-venv, socat (serial tests), RabbitMQ (started when installed, installed with apt
# when missing and we are root; otherwise print exactly what to run).
set -eu

need_apt=""
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt="$need_apt python3-venv"
command -v socat >/dev/null 2>&1 || need_apt="$need_apt socat"
command -v rabbitmq-server >/dev/null 2>&1 || [ -x /usr/sbin/rabbitmq-server ] || need_apt="$need_apt rabbitmq-server"

if [ -n "$need_apt" ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "ensure-system: installing$need_apt with apt-get"
        DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q $need_apt >/dev/null
    else
        echo "ensure-system: missing$need_apt; run: sudo apt-get install -y$need_apt" >&2
        exit 1
    fi
fi

PATH="$PATH:/usr/sbin:/sbin"
if ! rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        echo "ensure-system: starting RabbitMQ"
        rabbitmq-server -detached >/dev/null 2>&1 || true
        i=0
        until rabbitmq-diagnostics -q ping >/dev/null 2>&1; do
            i=$((i + 1))
            if [ "$i" -gt 60 ]; then
                echo "ensure-system: RabbitMQ did not start within 60 s" >&2
                exit 1
            fi
            sleep 1
        done
        # the node answers pings before the AMQP listener is up
        rabbitmqctl -q await_startup >/dev/null 2>&1 || true
    else
        echo "ensure-system: RabbitMQ is not running; run: sudo rabbitmq-server -detached" >&2
        exit 1
    fi
fi
echo "ensure-system: python3-venv, socat and RabbitMQ are ready"
