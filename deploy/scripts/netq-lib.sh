# Shared by the netq-*.sh scripts: sourced, not run. POSIX sh; needs mosquitto_pub and mosquitto_sub
# (Debian: apt-get install mosquitto-clients); uses jq when it is installed, plain sed and awk when not.
#
# Environment:
#   NETQ_HOST, NETQ_PORT      the farm's broker (default localhost 1883)
#   NETQ_USER, NETQ_PASSWORD  broker credentials, if the broker wants them
#   NETQ_BASE                 the farm's base topic (default netq)
#   NETQ_TIMEOUT              seconds to wait for an answer (default 10)
#   NETQ_NO_JQ=1              do not use jq even if it is installed

NETQ_HOST=${NETQ_HOST:-localhost}
NETQ_PORT=${NETQ_PORT:-1883}
NETQ_BASE=${NETQ_BASE:-netq}
NETQ_TIMEOUT=${NETQ_TIMEOUT:-10}
NETQ_ANSWER=

netq_die() {  # netq_die CODE MESSAGE...
    code=$1
    shift
    printf '%s: %s\n' "${0##*/}" "$*" >&2
    exit "$code"
}

netq_usage() {  # print the calling script's header comment, exit 2
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
    exit 2
}

netq_check_tools() {
    for tool in mosquitto_pub mosquitto_sub; do
        command -v "$tool" >/dev/null 2>&1 || netq_die 2 "$tool is not installed (apt-get install mosquitto-clients)"
    done
}

netq_have_jq() {
    [ -z "${NETQ_NO_JQ:-}" ] && command -v jq >/dev/null 2>&1
}

netq_pub() {  # netq_pub TOPIC PAYLOAD
    mosquitto_pub -h "$NETQ_HOST" -p "$NETQ_PORT" ${NETQ_USER:+-u "$NETQ_USER"} \
        ${NETQ_PASSWORD:+-P "$NETQ_PASSWORD"} -q 1 -t "$1" -m "$2" </dev/null
}

netq_sub() {  # netq_sub TOPIC [TIMEOUT]: one payload per line, until TIMEOUT seconds (0: no limit)
    if [ "${2:-0}" -gt 0 ]; then
        mosquitto_sub -h "$NETQ_HOST" -p "$NETQ_PORT" ${NETQ_USER:+-u "$NETQ_USER"} \
            ${NETQ_PASSWORD:+-P "$NETQ_PASSWORD"} -q 1 -t "$1" -W "$2" </dev/null
    else
        mosquitto_sub -h "$NETQ_HOST" -p "$NETQ_PORT" ${NETQ_USER:+-u "$NETQ_USER"} \
            ${NETQ_PASSWORD:+-P "$NETQ_PASSWORD"} -q 1 -t "$1" </dev/null
    fi
}

netq_sleep_briefly() {
    sleep 0.2 2>/dev/null || sleep 1
}

netq_json_string() {  # netq_json_string TEXT: TEXT as a quoted JSON string
    printf '"%s"' "$(printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g' | tr -d '\000-\037')"
}

netq_transaction() {
    rand=$(od -An -N4 -tx4 /dev/urandom 2>/dev/null | tr -d ' \n')
    printf 'sh-%s-%s-%s' "$(date +%s)" "$$" "${rand:-0}"
}

netq_field() {  # netq_field NAME JSON: the first string (or number, true, false) value of "NAME" in JSON
    printf '%s\n' "$2" | awk -v key="\"$1\": " '{
        i = index($0, key); if (!i) exit
        rest = substr($0, i + length(key))
        if (substr(rest, 1, 1) == "\"") {
            rest = substr(rest, 2); out = ""
            while (length(rest) > 0) {
                c = substr(rest, 1, 1)
                if (c == "\\") { out = out substr(rest, 2, 1); rest = substr(rest, 3); continue }
                if (c == "\"") break
                out = out c; rest = substr(rest, 2)
            }
            print out
        } else if (match(rest, /^[-0-9.eE+a-z]+/)) {
            print substr(rest, 1, RLENGTH)
        }
    }'
}

# netq_request PATH [JSON_OBJECT]: send a request with a fresh transaction, wait for its answer.
# Sets NETQ_ANSWER to the response envelope; returns 0 for "ok", 1 for "error"; exits 2 if nothing answers.
# mosquitto_sub cannot tell when its subscription is active, so the request is sent again every second
# with the same transaction until the answer comes: the farm applies a transaction once, and answers
# every repeat of it with the same result.
netq_request() {
    path=$1
    body=$(printf '%s' "${2:-}" | tr '\n\t' '  ' | sed 's/^ *{//; s/} *$//')
    txn=$(netq_transaction)
    if [ -n "$(printf '%s' "$body" | tr -d ' ')" ]; then
        payload="{\"transaction\": \"$txn\", $body}"
    else
        payload="{\"transaction\": \"$txn\"}"
    fi
    dir=$(mktemp -d 2>/dev/null || mktemp -d -t netq) || netq_die 2 "cannot create a temporary directory"
    mkfifo "$dir/out" || netq_die 2 "cannot create a FIFO in $dir"
    netq_sub "$NETQ_BASE/response/$path" "$NETQ_TIMEOUT" >"$dir/out" 2>"$dir/err" &
    sub=$!
    (
        netq_sleep_briefly
        while :; do
            netq_pub "$NETQ_BASE/request/$path" "$payload" 2>>"$dir/err" || exit 1
            sleep 1
        done
    ) >/dev/null &
    pub=$!
    NETQ_ANSWER=
    while IFS= read -r line; do
        case $line in
            *"\"transaction\": \"$txn\""*) NETQ_ANSWER=$line; break ;;
        esac
    done <"$dir/out"
    kill "$pub" "$sub" 2>/dev/null
    wait "$pub" "$sub" 2>/dev/null
    err=$(cat "$dir/err" 2>/dev/null)
    rm -rf "$dir"
    if [ -z "$NETQ_ANSWER" ]; then
        netq_die 2 "no answer on $NETQ_BASE/response/$path within ${NETQ_TIMEOUT}s from $NETQ_HOST:$NETQ_PORT" \
            "(is the farm running, an arbiter elected, the node online?) ${err}"
    fi
    case $NETQ_ANSWER in
        *'"status": "ok"'*) return 0 ;;
    esac
    return 1
}

netq_error() {  # the readable error of NETQ_ANSWER
    if netq_have_jq; then
        printf '%s\n' "$NETQ_ANSWER" | jq -r '.error // "unknown error"'
    else
        netq_field error "$NETQ_ANSWER"
    fi
}
