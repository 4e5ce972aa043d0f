#!/bin/sh
# netq-wait-job.sh [-n NAMESPACE] [-t SECONDS] JOB_ID: wait until a job has finished, from its retained topic.
#
#   id=$(netq-add-job.sh --url https://files.example.com/benchy.gcode) && netq-wait-job.sh "$id"
#
# Reads <base>/queues/<namespace>/jobs/<id> (retained, so a finished job answers at once) until the job's
# state is done, failed or cancelled, and prints that state.
# Options:
#   -n, --namespace NS   the job's queue (default: default)
#   -t, --timeout S      give up after S seconds (default: wait as long as it takes)
#   -v, --verbose        print every state change on stderr
# Exit status: 0 done, 1 failed, cancelled or removed, 2 bad usage, 3 timed out (or no such job).
# Broker and options from the environment: see netq-lib.sh (NETQ_HOST, NETQ_PORT, ...).
set -u
. "$(dirname "$0")/netq-lib.sh"

usage() { netq_usage; }
ns=default timeout=0 verbose= job_id=
while [ $# -gt 0 ]; do
    case $1 in
        -n|--namespace) [ $# -ge 2 ] || usage; ns=$2; shift ;;
        -t|--timeout) [ $# -ge 2 ] || usage; timeout=$2; shift ;;
        -v|--verbose) verbose=1 ;;
        -*) usage ;;
        *) [ -z "$job_id" ] || usage; job_id=$1 ;;
    esac
    shift
done
[ -n "$job_id" ] || usage
case $timeout in ''|*[!0-9]*) netq_die 2 "--timeout must be whole seconds" ;; esac
case "$ns$job_id" in *[+#/]*) netq_die 2 "namespace and job id cannot contain + # or /" ;; esac

netq_check_tools
dir=$(mktemp -d 2>/dev/null || mktemp -d -t netq) || netq_die 2 "cannot create a temporary directory"
mkfifo "$dir/out" || netq_die 2 "cannot create a FIFO in $dir"
netq_sub "$NETQ_BASE/queues/$ns/jobs/$job_id" "$timeout" >"$dir/out" 2>"$dir/err" &
sub=$!
result= last=
while IFS= read -r line; do
    if [ -z "$line" ]; then
        result=removed
        break
    fi
    # The job's summary state is the "state" that follows "remaining" (copies have states of their own).
    state=$(netq_field state "${line#*\"remaining\": }")
    if [ -n "$verbose" ] && [ "$state" != "$last" ]; then
        printf '%s: %s\n' "$job_id" "$state" >&2
    fi
    last=$state
    case $state in
        done|failed|cancelled) result=$state; break ;;
    esac
done <"$dir/out"
kill "$sub" 2>/dev/null
wait "$sub" 2>/dev/null
rm -rf "$dir"
case $result in
    done) echo done; exit 0 ;;
    '') netq_die 3 "timed out waiting for $ns/$job_id (last state: ${last:-none seen: no such job?})" ;;
    *) echo "$result"; exit 1 ;;
esac
