#!/usr/bin/env bash
# idem proxy in front of a small API, with curl: a 400, a 409, a 422 and a replay.
#
#   scripts/proxy-demo.sh            (builds idem in release mode if needed; needs python3, curl)
#
# The API (python3, port 3000 by default) takes 2 s per POST and numbers its charges, so a
# second execution would show as ch_2. The proxy listens on 8080 and requires a key on
# /charges. Everything runs on 127.0.0.1 and stops when the script ends.
set -euo pipefail
cd "$(dirname "$0")/.."
API_PORT=${API_PORT:-3000}
PROXY_PORT=${PROXY_PORT:-8080}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT

cargo build --release --quiet
python3 - "$API_PORT" <<'PY' &
import http.server, json, sys, threading, time
count = 0
lock = threading.Lock()
class Api(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        global count
        self.rfile.read(int(self.headers.get("content-length", 0)))
        time.sleep(2)
        with lock:
            count += 1
            body = json.dumps({"charge": f"ch_{count}"}).encode()
        self.send_response(201)
        self.send_header("content-type", "application/json")
        self.send_header("location", f"/charges/ch_{count}")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Api).serve_forever()
PY
./target/release/idem proxy --listen "127.0.0.1:$PROXY_PORT" --upstream "http://127.0.0.1:$API_PORT" \
    --data-dir "$work/data" --require-key /charges >/dev/null 2>"$work/proxy.log" &
for port in "$API_PORT" "$PROXY_PORT"; do
    for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.1; done
done

url="http://127.0.0.1:$PROXY_PORT/charges"
show() { echo; echo "\$ $*"; "$@" -s -i | grep -iv '^date:' ; echo; }

echo "== 1. no Idempotency-Key on a route that requires one: 400"
show curl -X POST "$url" -H 'content-type: application/json' -d '{"amount":1000}'

echo "== 2. the first request runs (2 s); the same key meanwhile: 409 with Retry-After"
curl -s -i -o "$work/first" -X POST "$url" -H 'Idempotency-Key: order-42' \
    -H 'content-type: application/json' -d '{"amount":1000,"currency":"eur"}' &
first=$!
sleep 0.5
show curl -X POST "$url" -H 'Idempotency-Key: order-42' -H 'content-type: application/json' \
    -d '{"amount":1000,"currency":"eur"}'
wait "$first"
echo "(meanwhile the first request got: $(head -n 1 "$work/first"), $(tail -c 18 "$work/first"))"

echo "== 3. a retry (keys reordered, key quoted): the stored response, Idempotent-Replayed: true"
show curl -X POST "$url" -H 'Idempotency-Key: "order-42"' -H 'content-type: application/json' \
    -d '{ "currency": "eur", "amount": 1000 }'

echo "== 4. the same key with another body: 422"
show curl -X POST "$url" -H 'Idempotency-Key: order-42' -H 'content-type: application/json' \
    -d '{"amount":9999,"currency":"eur"}'
