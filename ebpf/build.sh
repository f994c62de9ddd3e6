#!/usr/bin/env bash
# Builds cgmetric's eBPF object and puts it where the daemon embeds it
# (ebpf/prebuilt/cgmetric.bpf.o and cgmetric-walk.bpf.o). Needs the nightly pinned in
# rust-toolchain.toml, with rust-src, and bpf-linker (see
# .ci/install-ebpf-toolchain). `--check` builds into a
# temporary directory and fails if the committed object differs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

# The object must not depend on where the checkout is: cargo hashes a path
# package's location into symbol names, so the sources are built from one
# fixed staging path, and the remaining paths are remapped.
stage=/tmp/cgmetric-ebpf-build
target_dir=$(mktemp -d)
trap 'rm -rf "$target_dir" "$stage"' EXIT
rm -rf "$stage" && mkdir -p "$stage"
repo=$(dirname "$here")
nightly=$("$repo/.ci/nightly")
cp -r "$repo/common" "$stage/common"
mkdir "$stage/ebpf" && cp -r "$here/Cargo.toml" "$here/Cargo.lock" "$here/src" "$stage/ebpf/"
export RUSTFLAGS="-C debuginfo=2 -C link-arg=--btf --remap-path-prefix=$stage=cgmetric --remap-path-prefix=$HOME/.cargo=cargo --remap-path-prefix=$(rustc +"$nightly" --print sysroot)=rust"
(cd "$stage/ebpf" && cargo +"$nightly" build --release --locked \
    --target bpfel-unknown-none -Z build-std=core \
    --target-dir "$target_dir" -q)
# Two objects: the network programs, and the cgroup walk (loaded on its
# own, so that neither creates the other's maps).
objects=(cgmetric-ebpf:cgmetric.bpf.o cgmetric-walk:cgmetric-walk.bpf.o)
stale=0
for pair in "${objects[@]}"; do
    built="$target_dir/bpfel-unknown-none/release/${pair%%:*}"
    out="$here/prebuilt/${pair##*:}"
    # The BTF that aya and the kernel need stays; DWARF only served to make it.
    llvm-strip-22 --strip-debug "$built" 2>/dev/null || /usr/lib/llvm-22/bin/llvm-strip --strip-debug "$built"
    if [[ "${1:-}" == "--check" ]]; then
        if cmp -s "$built" "$out"; then
            echo "ebpf/prebuilt/${pair##*:} matches its source"
        else
            echo "ebpf/prebuilt/${pair##*:} is stale: run ebpf/build.sh and commit the result" >&2
            stale=1
        fi
    else
        mkdir -p "$(dirname "$out")"
        cp "$built" "$out"
        echo "wrote $out ($(stat -c %s "$out") bytes)"
    fi
done
exit $stale
