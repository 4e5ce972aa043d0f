#!/bin/sh
# netq-bed-cleared.sh NODE: tell a printer node that its bed has been cleared, so it takes its next job.
#
#   netq-bed-cleared.sh printer-2
#
# The same as `mosquitto_pub -t netq/request/node/bed_cleared -m printer-2`, but waits for the node's answer.
# Exit status: 0 done, 1 the node refused (e.g. it is not waiting for a clear bed), 2 no answer.
# Broker and options from the environment: see netq-lib.sh (NETQ_HOST, NETQ_PORT, ...).
set -u
. "$(dirname "$0")/netq-lib.sh"

case ${1:-} in
    ''|-h|--help) netq_usage ;;
esac
netq_check_tools
if netq_request node/bed_cleared "{\"node\": $(netq_json_string "$1")}"; then
    printf '%s: bed cleared\n' "$1"
    exit 0
fi
printf '%s: %s\n' "$1" "$(netq_error)" >&2
exit 1
