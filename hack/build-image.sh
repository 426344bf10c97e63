#!/usr/bin/env bash
# Builds the operator's OCI image and the dbpool-client example service's, without a container
# engine: umoci (Debian's package) writes an OCI image layout from a root filesystem made here.
#
#   hack/build-image.sh            # both images; prints the OCI archive paths on stdout
#   IMAGE_CHECK=0 hack/build-image.sh   # skip hack/check-image.py (the Dockerfile comparison)
#   IMAGE_CARGO_PROFILE=dev hack/build-image.sh   # the debug binaries `make test` built already
#                                   # (a cold release build costs ~14 CPU-minutes; default: release)
#
# What is in an image, as in distroless/cc: the release binary, exactly the shared libraries
# `ldd` says it loads (glibc, libgcc_s, libm, the dynamic loader: copied from this machine's
# Debian), /etc/passwd and /etc/group with nonroot (65532), /etc/nsswitch.conf, the CA bundle,
# /tmp and /home/nonroot. No shell, no package manager. Not a statically linked glibc binary
# (its name resolution is unreliable); the Dockerfile's musl build is the other way (it needs a
# target not installed here).
#
# umoci, not buildah: it needs no storage driver, no daemon and no user namespaces, and writes
# the OCI layout that `ctr images import` and `skopeo copy oci-archive:` read. The config
# (user, entrypoint, cmd, ports) is the Dockerfile's: hack/check-image.py compares the two.
#
# Outputs, under target/image/: <name>.oci/ (the layout), <name>.tar (the same as an OCI archive,
# annotated with its full name for `ctr -n k8s.io images import`), <name>.ref (that name).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CARGO="${CARGO:-cargo}"
OUT="$ROOT/target/image"
VERSION="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)"
REGISTRY="${IMAGE_REGISTRY:-ghcr.io/dbpool}"

log() { printf '[image] %s\n' "$*" >&2; }
command -v umoci >/dev/null || { log "umoci is missing: run hack/install-deps.sh"; exit 1; }

start=$(date +%s)
PROFILE="${IMAGE_CARGO_PROFILE:-release}"
PROFILE_DIR="$PROFILE"
[[ "$PROFILE" == dev ]] && PROFILE_DIR=debug
log "cargo build --profile $PROFILE (the operator and the client_service example)"
"$CARGO" build --profile "$PROFILE" --locked -p dbpool-operator --bin dbpool-operator >&2
"$CARGO" build --profile "$PROFILE" --locked -p dbpool-client --example client_service >&2

work="$(mktemp -d "${TMPDIR:-/tmp}/dbpool-image.XXXXXX")"
trap 'rm -rf "$work"' EXIT
mkdir -p "$OUT"

# rootfs DIR BINARY: the binary at /, its shared libraries at their paths, the distroless files.
rootfs() {
  local dir="$1" bin="$2" lib
  mkdir -p "$dir/etc/ssl/certs" "$dir/tmp" "$dir/home/nonroot"
  chmod 1777 "$dir/tmp"
  chown 65532:65532 "$dir/home/nonroot"
  install -m 0755 "$bin" "$dir/$(basename "$bin")"
  # ldd prints "name => /path (addr)" and "/lib64/ld-linux-x86-64.so.2 (addr)"; vdso has no file.
  while read -r lib; do
    mkdir -p "$dir$(dirname "$lib")"
    cp -L "$lib" "$dir$lib"
  done < <(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}')
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$dir/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' >"$dir/etc/group"
  # glibc's files and dns modules are built into libc.so.6 (2.34 and later): no libnss_* needed.
  printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$dir/etc/nsswitch.conf"
  if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
    cp /etc/ssl/certs/ca-certificates.crt "$dir/etc/ssl/certs/"
  fi
}

# image NAME BINARY ENTRYPOINT CMD PORT [ENV...]: the OCI layout, its archive and its name.
image() {
  local name="$1" bin="$2" entrypoint="$3" cmd="$4" port="$5"
  shift 5
  local ref="$REGISTRY/$name:$VERSION" layout="$OUT/$name.oci" bundle="$work/$name-bundle"
  rm -rf "$layout" "$OUT/$name.tar"
  umoci init --layout "$layout"
  umoci new --image "$layout:$VERSION"
  umoci unpack --image "$layout:$VERSION" "$bundle" >/dev/null
  rootfs "$bundle/rootfs" "$bin"
  umoci repack --image "$layout:$VERSION" "$bundle"
  local args=(--image "$layout:$VERSION" --config.user 65532:65532
    --config.entrypoint "$entrypoint" --config.workingdir /
    --config.exposedports "$port/tcp"
    --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    --config.env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
    --config.label "org.opencontainers.image.title=$name"
    --config.label "org.opencontainers.image.version=$VERSION"
    --config.label "org.opencontainers.image.licenses=Apache-2.0")
  [[ -n "$cmd" ]] && args+=(--config.cmd "$cmd")
  local env
  for env in "$@"; do args+=(--config.env "$env"); done
  umoci config "${args[@]}"
  umoci gc --layout "$layout"
  # The OCI ref.name is the tag alone; containerd names an imported image by its own annotation.
  python3 - "$layout/index.json" "$ref" <<'PY'
import json, sys
path, ref = sys.argv[1], sys.argv[2]
index = json.load(open(path))
for m in index["manifests"]:
    m.setdefault("annotations", {})["io.containerd.image.name"] = ref
json.dump(index, open(path, "w"))
PY
  tar -C "$layout" --sort=name --owner=0 --group=0 --numeric-owner -cf "$OUT/$name.tar" .
  echo "$ref" >"$OUT/$name.ref"
  log "$ref: $OUT/$name.tar ($(du -h "$OUT/$name.tar" | cut -f1))"
  echo "$OUT/$name.tar"
}

image dbpool-operator "target/$PROFILE_DIR/dbpool-operator" /dbpool-operator run 8080
image dbpool-client-service "target/$PROFILE_DIR/examples/client_service" /client_service "" 8080 \
  LISTEN_ADDR=0.0.0.0:8080

if [[ "${IMAGE_CHECK:-1}" != 0 ]]; then
  python3 hack/check-image.py Dockerfile "dbpool-operator=operator" "dbpool-client-service=client-service" >&2
fi
log "done in $(($(date +%s) - start))s"
