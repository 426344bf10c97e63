#!/usr/bin/env python3
"""Compares what the Dockerfile and the daemonless build (hack/build-image.sh) describe, and checks
the daemonless images' root filesystems.

    hack/check-image.py Dockerfile IMAGE=STAGE [IMAGE=STAGE...]
    hack/check-image.py --self-test

The build context that .dockerignore lets through must hold the whole workspace (cargo metadata
--locked there). For each pair: the Dockerfile stage STAGE and the OCI layout target/image/IMAGE.oci must agree on
the user, the entrypoint, the cmd and the exposed ports, so the two cannot drift. The image's root
filesystem must hold no shell, its binary's shared libraries must be exactly those it loads (as in
distroless/cc: nothing more), and the image's own loader must resolve them all there as 65532 (`ld.so --list` in a chroot).

Lives here: the comparison and the rootfs checks. Must not live here: building anything (that is
hack/build-image.sh).
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_dockerfile(text):
    """Stage name -> {user, entrypoint, cmd, ports}, from FROM ... AS, USER, ENTRYPOINT, CMD, EXPOSE."""
    stages, current = {}, None
    logical, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    for line in logical:
        word, _, rest = line.partition(" ")
        word, rest = word.upper(), rest.strip()
        if word == "FROM":
            parts = rest.split()
            name = parts[-1] if len(parts) >= 3 and parts[-2].upper() == "AS" else str(len(stages))
            current = stages[name] = {"user": None, "entrypoint": None, "cmd": None, "ports": []}
        elif current is None:
            continue
        elif word == "USER":
            current["user"] = rest
        elif word in ("ENTRYPOINT", "CMD"):
            value = json.loads(rest) if rest.startswith("[") else ["/bin/sh", "-c", rest]
            current[word.lower()] = value
        elif word == "EXPOSE":
            for port in rest.split():
                current["ports"].append(port if "/" in port else port + "/tcp")
    return stages


def oci_config(layout):
    """The image config of the one manifest in an OCI layout."""
    def blob(digest):
        algo, hexa = digest.split(":", 1)
        with open(os.path.join(layout, "blobs", algo, hexa)) as f:
            return json.load(f)

    with open(os.path.join(layout, "index.json")) as f:
        index = json.load(f)
    if len(index["manifests"]) != 1:
        raise SystemExit(f"{layout}: expected one manifest, found {len(index['manifests'])}")
    manifest = blob(index["manifests"][0]["digest"])
    return manifest, blob(manifest["config"]["digest"])


def described(config):
    """The image config in the Dockerfile's terms."""
    c = config.get("config", {})
    return {
        "user": c.get("User"),
        "entrypoint": c.get("Entrypoint"),
        "cmd": c.get("Cmd"),
        "ports": sorted(c.get("ExposedPorts", {}).keys()),
    }


def compare(image, stage, dockerfile_stage, config):
    """A list of differences (empty when they agree)."""
    want = dict(dockerfile_stage, ports=sorted(dockerfile_stage["ports"]))
    got = described(config)
    return [f"{image} vs Dockerfile stage {stage}: {k}: image {got[k]!r}, Dockerfile {want[k]!r}"
            for k in want if want[k] != got[k]]


def unpack(layout, manifest, dest):
    """Extracts the image's layers (no whiteouts in these single-layer images) into dest."""
    for layer in manifest["layers"]:
        algo, hexa = layer["digest"].split(":", 1)
        with tarfile.open(os.path.join(layout, "blobs", algo, hexa)) as tar:
            tar.extractall(dest, filter="tar") if hasattr(tarfile, "data_filter") else tar.extractall(dest)


def needed_libraries(binary):
    """The absolute paths ldd resolves for binary (the loader included)."""
    out = subprocess.run(["ldd", binary], check=True, capture_output=True, text=True).stdout
    libs = set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] == "=>" and parts[2].startswith("/"):
            libs.add(parts[2])
        elif parts and parts[0].startswith("/"):
            libs.add(parts[0])
    return libs


def check_rootfs(image, rootfs, entrypoint):
    """Problems with the unpacked root filesystem (empty when none)."""
    problems = []
    shells = {"sh", "bash", "dash", "ash", "busybox", "zsh"}
    shared = set()
    for dirpath, _dirs, files in os.walk(rootfs):
        for name in files:
            rel = "/" + os.path.relpath(os.path.join(dirpath, name), rootfs)
            if name in shells:
                problems.append(f"{image}: a shell in the image: {rel}")
            if ".so" in name:
                shared.add(rel)
    binary = os.path.join(rootfs, entrypoint.lstrip("/"))
    want = needed_libraries(binary)
    if shared != want:
        problems.append(f"{image}: shared libraries {sorted(shared)}, the binary loads {sorted(want)}")
    # The dynamic loader of the image resolves every library inside the image, as 65532.
    loader = next((p for p in sorted(want) if "/ld-linux" in p), None)
    if loader is None:
        problems.append(f"{image}: {entrypoint} names no dynamic loader")
        return problems
    run = subprocess.run(["chroot", "--userspec=65532:65532", rootfs, loader, "--list", entrypoint],
                         capture_output=True, text=True, timeout=30)
    if run.returncode != 0 or "not found" in run.stdout + run.stderr:
        problems.append(f"{image}: {loader} --list {entrypoint} in its rootfs exited "
                        f"{run.returncode}: {(run.stdout + run.stderr)[-400:]}")
    return problems


def check_context(dockerignore):
    """Problems with the Docker build context: cargo must load the workspace from what the
    .dockerignore (a `*` followed by `!path` lines) lets through."""
    with open(dockerignore) as f:
        lines = [l.strip() for l in f if l.strip() and not l.startswith("#")]
    if lines[0] != "*" or not all(l.startswith("!") for l in lines[1:]):
        return [f"{dockerignore}: expected `*` then `!path` lines only"]
    with tempfile.TemporaryDirectory() as tmp:
        for entry in lines[1:]:
            rel = entry[1:].rstrip("/")
            src = os.path.join(ROOT, rel)
            if os.path.isdir(src):
                shutil.copytree(src, os.path.join(tmp, rel), ignore=shutil.ignore_patterns("target"))
            elif os.path.exists(src):
                shutil.copy2(src, os.path.join(tmp, rel))
        run = subprocess.run([os.environ.get("CARGO", "cargo"), "metadata", "--locked", "--offline",
                              "--format-version", "1", "--no-deps"],
                             cwd=tmp, capture_output=True, text=True, timeout=120)
        if run.returncode != 0:
            return [f"cargo cannot load the workspace from the Docker context: {run.stderr[-600:]}"]
    return []


def self_test():
    """The Dockerfile parser on a small example with continuation lines and two stages."""
    stages = parse_dockerfile(
        "FROM a AS builder\nRUN x \\\n  && y\nFROM b AS one\nUSER 1:1\nEXPOSE 80 53/udp\n"
        'ENTRYPOINT ["/x"]\nCMD ["run"]\nFROM c\nCMD echo hi\n')
    assert stages["one"] == {"user": "1:1", "entrypoint": ["/x"], "cmd": ["run"],
                             "ports": ["80/tcp", "53/udp"]}, stages
    assert stages["2"]["cmd"] == ["/bin/sh", "-c", "echo hi"], stages
    cfg = {"config": {"User": "1:1", "Entrypoint": ["/x"], "Cmd": ["run"],
                      "ExposedPorts": {"53/udp": {}, "80/tcp": {}}}}
    assert compare("i", "one", stages["one"], cfg) == []
    cfg["config"]["Cmd"] = None
    assert len(compare("i", "one", stages["one"], cfg)) == 1
    print("check-image self-test: ok")


def main(argv):
    if argv[1:] == ["--self-test"]:
        self_test()
        return 0
    with open(argv[1]) as f:
        stages = parse_dockerfile(f.read())
    problems = check_context(os.path.join(os.path.dirname(os.path.abspath(argv[1])), ".dockerignore"))
    if not problems:
        print("check-image: cargo loads the workspace from the Docker build context")
    for pair in argv[2:]:
        image, stage = pair.split("=", 1)
        if stage not in stages:
            problems.append(f"Dockerfile has no stage {stage}")
            continue
        layout = os.path.join(ROOT, "target", "image", image + ".oci")
        manifest, config = oci_config(layout)
        problems += compare(image, stage, stages[stage], config)
        with tempfile.TemporaryDirectory() as tmp:
            unpack(layout, manifest, tmp)
            entry = (described(config)["entrypoint"] or [""])[0]
            problems += check_rootfs(image, tmp, entry)
        print(f"check-image: {image} agrees with Dockerfile stage {stage}: "
              f"{shlex.join(described(config)['entrypoint'] or [])} {described(config)['cmd']} "
              f"as {described(config)['user']}, ports {described(config)['ports']}")
    for p in problems:
        print("check-image: " + p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
