#!/usr/bin/env bash
# Makes sure `cargo +nightly miri` works: Miri only ships with nightly toolchains. Installs a
# minimal nightly with the miri and rust-src components through rustup when it is missing, and
# prepares Miri's sysroot. Exits 1, saying why, when that cannot be done (no rustup, no access
# to static.rust-lang.org), so callers can skip Miri with a notice.
set -uo pipefail
if ! cargo +nightly miri --version >/dev/null 2>&1; then
  command -v rustup >/dev/null || { echo "Miri unavailable: rustup is not installed"; exit 1; }
  # Fail fast where the distribution server is out of reach rather than wait on rustup.
  dist="${RUSTUP_DIST_SERVER:-https://static.rust-lang.org}"
  if command -v curl >/dev/null && ! curl -sfI --max-time 15 "$dist/dist/channel-rust-nightly.toml" >/dev/null; then
    echo "Miri unavailable: $dist cannot be reached to install a nightly toolchain"
    exit 1
  fi
  echo "== rustup: installing nightly with miri (minimal profile)"
  if ! timeout 420 rustup toolchain install nightly --profile minimal --component miri rust-src \
       >build/miri-toolchain.log 2>&1 &&
     ! timeout 180 rustup component add --toolchain nightly miri rust-src >>build/miri-toolchain.log 2>&1; then
    tail -n 5 build/miri-toolchain.log
    echo "Miri unavailable: the nightly toolchain could not be installed (build/miri-toolchain.log)"
    exit 1
  fi
fi
cargo +nightly miri setup >build/miri-setup.log 2>&1 ||
  { tail -n 20 build/miri-setup.log; echo "Miri unavailable: cargo miri setup failed"; exit 1; }
cargo +nightly miri --version
