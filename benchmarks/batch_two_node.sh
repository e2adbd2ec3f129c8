#!/usr/bin/env bash
# `trimformer batch --ray` on a two-node local Ray cluster (two raylets on this machine, one CPU each):
#   1. 200 LongBench-style prompts (a ~LENGTH-token stretch of the Paul Graham essays + a question, as
#      benchmarks/batch_throughput.py builds them);
#   2. the single-process reference (no --ray, --threads 2) -> ref.jsonl;
#   3. a head node and a second node of one CPU each (own --temp-dir, own ports; `ray stop` is never used,
#      so no other cluster on the machine is touched), checked to be 2 nodes;
#   4. --ray --actors 2 --threads-per-actor 1 with one actor process killed (-9) mid-job: 200 lines, each id
#      once, answers equal to the reference;
#   5. the same command on a fresh output, its driver killed (-9) about half-way, then run again: 200 lines,
#      each id once, the lines written before the stop unchanged and none redone;
#   6. both nodes stopped (the processes this script started, by pid); the figures in $OUT_JSON.
# Usage (from anywhere): benchmarks/batch_two_node.sh   [env: MODEL METHOD PROMPTS LENGTH NEW_TOKENS OUT_JSON]
# The token auth that Ray 2.60 turns on for `ray start --head` is kept, with a token of this run's own.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python
TF=$ROOT/.venv/bin/trimformer
RAY=$ROOT/.venv/bin/ray
MODEL=${MODEL:-smollm2-135m}
METHOD=${METHOD:-lazy}
PROMPTS=${PROMPTS:-200}
LENGTH=${LENGTH:-512}
NEW_TOKENS=${NEW_TOKENS:-8}
OUT_JSON=${OUT_JSON:-$ROOT/benchmarks/results/batch/two_node.json}
RUN_TIMEOUT=${RUN_TIMEOUT:-1200}

WORK=$(mktemp -d /tmp/b2n.XXXXXX)
RAYTMP=$WORK/ray
mkdir -p "$RAYTMP"
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$WORK/auth_token
"$PY" -c "import secrets; print(secrets.token_hex(32))" > "$RAY_AUTH_TOKEN_PATH"
chmod 600 "$RAY_AUTH_TOKEN_PATH"
GCS=""
DRIVER=""
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

# ---- the processes of this script's cluster ---------------------------------------------------------
cluster_pids() {   # the processes whose command line names our temp dir or GCS address, and their descendants
  "$PY" - "$RAYTMP" "${GCS:-$RAYTMP}" <<'EOF'
import os, sys
marks = sys.argv[1:]
procs = {}
for p in os.listdir("/proc"):
    if not p.isdigit():
        continue
    try:
        cmd = open(f"/proc/{p}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        ppid = int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        continue
    procs[int(p)] = (ppid, cmd)
me = os.getpid()
mine = {p for p, (_, cmd) in procs.items() if p != me and any(m in cmd for m in marks)}
grown = True
while grown:
    more = {p for p, (ppid, _) in procs.items() if ppid in mine and p not in mine and p != me}
    mine |= more
    grown = bool(more)
print(" ".join(map(str, sorted(mine))))
EOF
}

raylets() {        # pids of our raylets, head first (started first)
  local p
  for p in $(pgrep -f "raylet/raylet .*$RAYTMP" | sort -n); do echo "$p"; done
}

actor_pids() {     # "pid raylet_pid" of each Ray Data actor process of ours
  local r p
  for r in $(raylets); do
    for p in $(pgrep -P "$r"); do
      if tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | grep -q "ray::MapWorker\|ModelActor"; then echo "$p $r"; fi
    done
  done
}

live() {           # those of the pids given that still run (not zombies)
  local p
  for p in "$@"; do
    [ -r "/proc/$p/stat" ] && [ "$(awk '{print $3}' "/proc/$p/stat" 2>/dev/null)" != Z ] && echo "$p"
  done
  return 0
}

stop_cluster() {
  local pids
  if [ -n "$DRIVER" ] && kill -0 "$DRIVER" 2>/dev/null; then
    pkill -9 -P "$DRIVER" 2>/dev/null || true; kill -9 "$DRIVER" 2>/dev/null || true
  fi
  pids=$(cluster_pids)
  [ -z "$pids" ] && return 0
  log "stopping the cluster: pids $pids"
  kill -TERM $pids 2>/dev/null || true
  for _ in $(seq 20); do
    sleep 0.5
    pids=$(live $pids)
    [ -z "$pids" ] && break
  done
  [ -n "$pids" ] && kill -KILL $pids 2>/dev/null || true
  sleep 1
  NODES_STOPPED=$([ -z "$(live $(cluster_pids))" ] && echo true || echo false)
}
trap 'stop_cluster' EXIT

free_ports() { "$PY" -c "
import socket
s = [socket.socket() for _ in range($1)]
for x in s: x.bind(('', 0))
print(' '.join(str(x.getsockname()[1]) for x in s))"; }

elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN {printf "%.2f", b - a}'; }

count_lines() { [ -f "$1" ] && wc -l < "$1" || echo 0; }

# ---- 1. prompts ---------------------------------------------------------------------------------------
log "work dir $WORK; building $PROMPTS prompts of $LENGTH passage tokens"
"$PY" - "$MODEL" "$PROMPTS" "$LENGTH" "$WORK/prompts.jsonl" <<'EOF'
import json, sys
sys.path.insert(0, "benchmarks")
from batch_throughput import build_prompts
model, count, length, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
with open(path, "w") as f:
    for i, p in enumerate(build_prompts(model, count, length)):
        f.write(json.dumps({"id": f"lb-{i:03d}", "prompt": p}) + "\n")
EOF
COMMON=(--input "$WORK/prompts.jsonl" --model "$MODEL" --method "$METHOD" --max-new-tokens "$NEW_TOKENS")

# ---- 2. single-process reference ----------------------------------------------------------------------
log "single-process reference"
t0=$(date +%s.%N)
timeout "$RUN_TIMEOUT" "$TF" batch "${COMMON[@]}" --output "$WORK/ref.jsonl" --threads 2 2> "$WORK/ref.err"
REF_S=$(elapsed "$t0")
log "reference: $(count_lines "$WORK/ref.jsonl") lines in $REF_S s"

# ---- 3. two nodes ------------------------------------------------------------------------------------
read -r -a P <<< "$(free_ports 18)"
HEAD_IP=$("$PY" -c "from ray._private.services import resolve_ip_for_localhost as r; print(r('127.0.0.1'))")
GCS="$HEAD_IP:${P[0]}"
log "head node at $GCS"
"$RAY" start --head --num-cpus 1 --temp-dir "$RAYTMP" --port "${P[0]}" --include-dashboard=false \
  --node-ip-address 127.0.0.1 --disable-usage-stats --dashboard-port "${P[1]}" --ray-client-server-port "${P[2]}" \
  --dashboard-agent-listen-port "${P[3]}" --dashboard-agent-grpc-port "${P[4]}" --runtime-env-agent-port "${P[5]}" \
  --metrics-export-port "${P[6]}" --node-manager-port "${P[7]}" --object-manager-port "${P[8]}" \
  > "$WORK/head.log" 2>&1
log "second node"
"$RAY" start --address "$GCS" --num-cpus 1 --node-ip-address 127.0.0.1 --disable-usage-stats \
  --dashboard-agent-listen-port "${P[9]}" --dashboard-agent-grpc-port "${P[10]}" --runtime-env-agent-port "${P[11]}" \
  --metrics-export-port "${P[12]}" --node-manager-port "${P[13]}" --object-manager-port "${P[14]}" \
  > "$WORK/node2.log" 2>&1
NODES=0
for _ in $(seq 30); do
  "$RAY" status --address "$GCS" > "$WORK/status.txt" 2>&1 || true
  NODES=$(sed -n '/^Active:/,/^Pending:/p' "$WORK/status.txt" | grep -c "node_" || true)
  [ "$NODES" -ge 2 ] && break
  sleep 1
done
cat "$WORK/status.txt" >&2
log "ray status: $NODES active nodes; raylets: $(raylets | tr '\n' ' ')"
[ "$NODES" -eq 2 ] || { log "expected 2 nodes"; exit 1; }

RAYRUN=(batch "${COMMON[@]}" --ray --ray-address "$GCS" --actors 2 --threads-per-actor 1)

# ---- 4. one actor killed mid-job ----------------------------------------------------------------------
log "ray run, one actor to be killed"
t0=$(date +%s.%N)
timeout "$RUN_TIMEOUT" "$TF" "${RAYRUN[@]}" --output "$WORK/kill.jsonl" 2> "$WORK/kill.err" &
DRIVER=$!
until [ "$(count_lines "$WORK/kill.jsonl")" -ge $((PROMPTS / 10)) ] || ! kill -0 "$DRIVER" 2>/dev/null; do sleep 0.5; done
actor_pids > "$WORK/actors_before.txt"
log "actors (pid raylet): $(tr '\n' ';' < "$WORK/actors_before.txt")"
SECOND_RAYLET=$(raylets | sed -n 2p)
VICTIM=$(awk -v r="$SECOND_RAYLET" '$2 == r {print $1; exit}' "$WORK/actors_before.txt")
[ -n "$VICTIM" ] || VICTIM=$(awk 'NR == 1 {print $1}' "$WORK/actors_before.txt")
VICTIM_NODE=$([ "$(awk -v v="$VICTIM" '$1 == v {print $2}' "$WORK/actors_before.txt")" = "$SECOND_RAYLET" ] && echo second || echo head)
LINES_AT_KILL=$(count_lines "$WORK/kill.jsonl")
KILL_DONE=false
if [ -n "$VICTIM" ]; then
  log "kill -9 actor $VICTIM ($(tr '\0' ' ' < /proc/$VICTIM/cmdline | cut -c1-80)) on the $VICTIM_NODE node at $LINES_AT_KILL lines"
  kill -9 "$VICTIM" && KILL_DONE=true
fi
RESTARTED=""
for _ in $(seq 120); do
  RESTARTED=$(actor_pids | awk -v v="$VICTIM" 'NR == FNR {old[$1]; next} !($1 in old) && $1 != v {print $1; exit}' "$WORK/actors_before.txt" - || true)
  [ -n "$RESTARTED" ] || ! kill -0 "$DRIVER" 2>/dev/null && break
  sleep 0.5
done
log "new actor process: ${RESTARTED:-none seen}"
KILL_RC=0; wait "$DRIVER" || KILL_RC=$?
DRIVER=""
KILL_S=$(elapsed "$t0")
log "kill run: rc $KILL_RC, $(count_lines "$WORK/kill.jsonl") lines in $KILL_S s"
tail -n 3 "$WORK/kill.err" >&2

# ---- 5. stop part-way and re-run ----------------------------------------------------------------------
log "ray run, driver to be stopped half-way"
t0=$(date +%s.%N)
timeout "$RUN_TIMEOUT" "$TF" "${RAYRUN[@]}" --output "$WORK/resume.jsonl" 2> "$WORK/stop.err" &
DRIVER=$!
until [ "$(count_lines "$WORK/resume.jsonl")" -ge $((PROMPTS / 2)) ] || ! kill -0 "$DRIVER" 2>/dev/null; do sleep 0.2; done
TF_PID=$(pgrep -P "$DRIVER" | head -n 1)     # trimformer itself, under timeout
LINES_AT_STOP=$(count_lines "$WORK/resume.jsonl")
kill -9 "$TF_PID" 2>/dev/null || true
STOP_RC=0; wait "$DRIVER" 2>/dev/null || STOP_RC=$?
DRIVER=""
STOP_S=$(elapsed "$t0")
sleep 2
DRIVER_GONE=$([ -z "$(live "$TF_PID")" ] && echo true || echo false)
cp "$WORK/resume.jsonl" "$WORK/before_stop.jsonl"
log "driver $TF_PID killed (rc $STOP_RC, gone: $DRIVER_GONE) at $LINES_AT_STOP lines after $STOP_S s; $(count_lines "$WORK/before_stop.jsonl") lines before the re-run"
log "re-run"
t0=$(date +%s.%N)
RERUN_RC=0
timeout "$RUN_TIMEOUT" "$TF" "${RAYRUN[@]}" --output "$WORK/resume.jsonl" 2> "$WORK/rerun.err" || RERUN_RC=$?
RERUN_S=$(elapsed "$t0")
log "re-run: rc $RERUN_RC, $(count_lines "$WORK/resume.jsonl") lines in $RERUN_S s"
tail -n 1 "$WORK/rerun.err" >&2

# ---- 6. stop the nodes, figures -----------------------------------------------------------------------
NODES_STOPPED=false
stop_cluster
log "nodes stopped: $NODES_STOPPED"
trap - EXIT

"$PY" - "$WORK" "$OUT_JSON" <<EOF
import json, os, sys, platform
work, out = sys.argv[1], sys.argv[2]

def records(name):
    with open(os.path.join(work, name), "rb") as f:
        data = f.read()
    return [json.loads(l) for l in data.splitlines() if l.strip()], data

def summary(name):
    lines = [l for l in open(os.path.join(work, name), errors="replace").read().splitlines()
             if l.startswith("trimformer batch:")]
    return lines[-1] if lines else None

prompts = sum(1 for l in open(os.path.join(work, "prompts.jsonl")) if l.strip())
ref, _ = records("ref.jsonl")
ref_by = {r["id"]: r for r in ref}
ref_errors = sum("error" in r for r in ref)

def check(recs):
    ids = [r.get("id") for r in recs]
    return {
        "lines_out": len(recs),
        "distinct_ids": len(set(ids)),
        "duplicate_ids": len(ids) - len(set(ids)),
        "errors": sum("error" in r for r in recs),
        "missing_ids": len(set(ref_by) - set(ids)),
        "mismatches_vs_ref": sum(1 for r in recs if r.get("id") not in ref_by
                                 or r.get("answer") != ref_by[r["id"]].get("answer")
                                 or r.get("new_tokens") != ref_by[r["id"]].get("new_tokens")),
    }

kill_recs, _ = records("kill.jsonl")
final, final_bytes = records("resume.jsonl")
before_bytes = open(os.path.join(work, "before_stop.jsonl"), "rb").read()
complete = before_bytes[: before_bytes.rfind(b"\n") + 1]
before = [json.loads(l) for l in complete.splitlines() if l.strip()]
after = final_bytes[len(complete):]
rerun_recs = [json.loads(l) for l in after.splitlines() if l.strip()]
before_ids = {r["id"] for r in before}
tokens = [r["prompt_tokens"] for r in ref if "prompt_tokens" in r]

result = {
    "model": "$MODEL", "method": "$METHOD", "prompts": prompts, "passage_tokens": $LENGTH,
    "prompt_tokens_mean": round(sum(tokens) / len(tokens), 1), "max_new_tokens": $NEW_TOKENS,
    "nodes": $NODES, "cpus_per_node": 1, "actors": 2, "threads_per_actor": 1,
    "command": "trimformer batch --input prompts.jsonl --output OUT --model $MODEL --method $METHOD "
               "--max-new-tokens $NEW_TOKENS --ray --ray-address HEAD --actors 2 --threads-per-actor 1",
    "single_process": {"threads": 2, "seconds": round($REF_S, 1), "lines_out": len(ref), "errors": ref_errors},
    "actor_killed": {
        "seconds": round($KILL_S, 1), "exit_code": $KILL_RC, **check(kill_recs),
        "killed_actor_pid": int("${VICTIM:-0}") or None, "killed_on_node": "$VICTIM_NODE",
        "kill_sent": "$KILL_DONE" == "true", "lines_at_kill": $LINES_AT_KILL,
        "new_actor_pid": int("${RESTARTED:-0}") or None,
        "all_lines_written": len({r.get("id") for r in kill_recs} & set(ref_by)) == prompts == len(kill_recs),
        "summary": summary("kill.err"),
    },
    "resume": {
        "stop": "kill -9 of the driver (trimformer batch)", "seconds_to_stop": round($STOP_S, 1),
        "lines_at_stop": $LINES_AT_STOP, "driver_gone": "$DRIVER_GONE" == "true",
        "bytes_before_stop": len(before_bytes), "partial_line_at_stop": len(before_bytes) > len(complete),
        "lines_before_stop": len(before),
        "before_unchanged": final_bytes.startswith(complete),
        "lines_written_by_rerun": len(rerun_recs),
        "redone": sum(r.get("id") in before_ids for r in rerun_recs),
        "rerun_ids_written_twice": len(rerun_recs) - len({r.get("id") for r in rerun_recs}),
        "rerun_seconds": round($RERUN_S, 1), "rerun_exit_code": $RERUN_RC,
        "rerun_summary": summary("rerun.err"),
        **check(final),
    },
    "nodes_stopped": "$NODES_STOPPED" == "true",
    "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
}
try:
    import ray, torch
    result["machine"].update(ray=ray.__version__, torch=torch.__version__)
except ImportError:
    pass
print(json.dumps(result, indent=2))
os.makedirs(os.path.dirname(out), exist_ok=True)
with open(out, "w") as f:
    f.write(json.dumps(result, indent=2) + "\n")
EOF
log "work files kept in $WORK"
