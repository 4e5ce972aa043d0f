#!/bin/sh
# netq-add-job.sh [options] --url URL | --sha256 HASH --holder NODE: queue a job of one G-code file.
#
#   netq-add-job.sh --url https://files.example.com/benchy.gcode --count 3
#   netq-add-job.sh --sha256 9f86d081... --holder printer-1 --file benchy.gcode -n prototypes
#
# Options:
#   -u, --url URL         the file's URL (http or https): the arbiter downloads it and holds it
#   -S, --sha256 HASH     the file's sha256 (with --url, the download must match it)
#   -H, --holder NODE     a node that holds the file already (repeat for several)
#   -f, --file NAME       the file's name as shown (default: the last part of the URL)
#   -n, --namespace NS    the queue (default: default)
#   -c, --count N         copies of the whole job (default 1)
#   -s, --set-count N     prints of the file in each copy (default 1)
#   -N, --name NAME       the job's name (default: the file's name)
#   -p, --priority N      -1000 to 1000 (default 0)
#   -m, --material M      the material of each tool, TYPE or TYPE:COLOR (repeat per tool)
#   -i, --id ID           the job's id (default: the farm picks one)
#
# Prints the new job's id. Exit status: 0 queued, 1 the farm refused (its reason on stderr), 2 no answer.
# Broker and options from the environment: see netq-lib.sh (NETQ_HOST, NETQ_PORT, ...).
set -u
. "$(dirname "$0")/netq-lib.sh"

usage() { netq_usage; }
number() {  # number NAME VALUE: VALUE if it is an integer
    case $2 in
        ''|-|*[!0-9-]*|?*-*) netq_die 2 "$1 must be a whole number, not '$2'" ;;
    esac
    printf '%s' "$2"
}

url= sha= file= ns=default count=1 set_count=1 name= priority=0 job_id= holders= materials=
while [ $# -gt 0 ]; do
    [ $# -ge 2 ] || case $1 in -h|--help) ;; *) usage ;; esac
    case $1 in
        -u|--url) url=$2 ;;
        -S|--sha256) sha=$2 ;;
        -H|--holder) holders="${holders:+$holders, }$(netq_json_string "$2")" ;;
        -f|--file) file=$2 ;;
        -n|--namespace) ns=$2 ;;
        -c|--count) count=$(number count "$2") || exit 2 ;;
        -s|--set-count) set_count=$(number set-count "$2") || exit 2 ;;
        -N|--name) name=$2 ;;
        -p|--priority) priority=$(number priority "$2") || exit 2 ;;
        -m|--material)
            case $2 in
                none|-|'') m=null ;;
                *:*) m="{\"type\": $(netq_json_string "${2%%:*}"), \"color\": $(netq_json_string "${2#*:}")}" ;;
                *) m="{\"type\": $(netq_json_string "$2")}" ;;
            esac
            materials="${materials:+$materials, }$m" ;;
        -i|--id) job_id=$2 ;;
        -h|--help) usage ;;
        *) printf '%s: unknown option %s\n' "${0##*/}" "$1" >&2; usage ;;
    esac
    shift 2
done
[ -n "$url" ] || [ -n "$sha" ] || usage
[ -n "$url" ] || [ -n "$holders" ] || netq_die 2 "give --holder NODE with --sha256 (or use --url)"
[ -n "$file" ] || [ -n "$url" ] || file="$sha.gcode"

set_json="\"count\": $set_count"
[ -n "$url" ] && set_json="$set_json, \"url\": $(netq_json_string "$url")"
[ -n "$sha" ] && set_json="$set_json, \"sha256\": $(netq_json_string "$sha")"
[ -n "$holders" ] && set_json="$set_json, \"holders\": [$holders]"
[ -n "$file" ] && set_json="$set_json, \"file\": $(netq_json_string "$file")"
[ -n "$materials" ] && set_json="$set_json, \"materials\": [$materials]"
body="\"namespace\": $(netq_json_string "$ns"), \"count\": $count, \"priority\": $priority, \"sets\": [{$set_json}]"
[ -n "$name" ] && body="$body, \"name\": $(netq_json_string "$name")"
[ -n "$job_id" ] && body="$body, \"id\": $(netq_json_string "$job_id")"

netq_check_tools
[ -n "$url" ] && NETQ_TIMEOUT=${NETQ_ADD_TIMEOUT:-$((NETQ_TIMEOUT > 60 ? NETQ_TIMEOUT : 60))}  # downloads take time
if netq_request job/add "{$body}"; then
    if netq_have_jq; then
        printf '%s\n' "$NETQ_ANSWER" | jq -r '.data.id'
    else
        netq_field id "$NETQ_ANSWER"
    fi
    exit 0
fi
printf '%s: %s\n' "${0##*/}" "$(netq_error)" >&2
exit 1
