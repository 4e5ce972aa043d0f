#!/bin/sh
# netq-request.sh PATH [JSON]: send any request of the farm's MQTT API and print its answer.
#
#   netq-request.sh queue/pause '{"namespace": "prototypes"}'
#   netq-request.sh node/list
#
# Prints the response envelope ({"status": ..., "data": ..., "transaction": ...}) on one line.
# Exit status: 0 ok, 1 the farm answered an error, 2 no answer (or bad usage).
# Broker and options from the environment: see netq-lib.sh (NETQ_HOST, NETQ_PORT, ...).
set -u
. "$(dirname "$0")/netq-lib.sh"

case ${1:-} in
    ''|-h|--help) netq_usage ;;
esac
netq_check_tools
netq_request "$1" "${2:-}"
status=$?
printf '%s\n' "$NETQ_ANSWER"
exit "$status"
