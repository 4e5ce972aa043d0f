#!/bin/sh
# netq-list-queue.sh [-n NAMESPACE] [-a] [--json]: list the jobs of one queue (default: every queue).
#
#   netq-list-queue.sh -n prototypes
#
# One line per job, tab-separated: namespace, id, state, copies remaining, copies, name.
# States: queued, claimed, printing, orphaned, done, failed, cancelled.
# Options:
#   -n, --namespace NS   only this queue
#   -a, --active         hide finished jobs
#   --json               print the farm's whole answer instead (JSON)
# Exit status: 0 listed, 1 the farm refused, 2 no answer.
# Broker and options from the environment: see netq-lib.sh (NETQ_HOST, NETQ_PORT, ...).
set -u
. "$(dirname "$0")/netq-lib.sh"

usage() { netq_usage; }
ns= active= raw=
while [ $# -gt 0 ]; do
    case $1 in
        -n|--namespace) [ $# -ge 2 ] || usage; ns=$2; shift ;;
        -a|--active) active=1 ;;
        --json) raw=1 ;;
        *) usage ;;
    esac
    shift
done
body="\"include_done\": $([ -n "$active" ] && echo false || echo true)"
[ -n "$ns" ] && body="$body, \"namespace\": $(netq_json_string "$ns")"

netq_check_tools
if ! netq_request queue/list "{$body}"; then
    printf '%s: %s\n' "${0##*/}" "$(netq_error)" >&2
    exit 1
fi
if [ -n "$raw" ]; then
    printf '%s\n' "$NETQ_ANSWER"
elif netq_have_jq; then
    printf '%s\n' "$NETQ_ANSWER" | jq -r '.data.jobs[] | [.namespace, .id, .state, .remaining, (.copies | length), .name] | @tsv'
else
    # Without jq: each job of the answer starts with {"id": "; its summary state follows "remaining".
    printf '%s\n' "$NETQ_ANSWER" | awk '
        function str(s, key,   i, t) {
            i = index(s, "\"" key "\": \""); if (!i) return ""
            t = substr(s, i + length(key) + 5); return substr(t, 1, index(t, "\"") - 1)
        }
        function num(s, key,   i, t) {
            i = index(s, "\"" key "\": "); if (!i) return ""
            t = substr(s, i + length(key) + 4); match(t, /^[0-9]+/); return substr(t, 1, RLENGTH)
        }
        function count(s, what,   n, i) {
            n = 0; while ((i = index(s, what)) > 0) { n++; s = substr(s, i + length(what)) } return n
        }
        {
            marker = "{\"id\": \""
            s = substr($0, index($0, "\"jobs\": ["))
            while ((i = index(s, marker)) > 0) {
                s = substr(s, i + 1)
                j = index(s, marker)
                job = (j > 0) ? substr(s, 1, j - 1) : s
                tail = substr(job, index(job, "\"remaining\": "))
                printf "%s\t%s\t%s\t%s\t%s\t%s\n", str(job, "namespace"), str(job, "id"), str(tail, "state"),
                    num(tail, "remaining"), count(job, "{\"index\": "), str(job, "name")
            }
        }'
fi
