#!/usr/bin/env bash
# Cargo's rustc wrapper (see .cargo/config.toml). bash, not sh: dash drops environment
# variables whose names are not identifiers, such as CARGO_BIN_EXE_cdc-indexer.
#
# qdrant-edge 0.9.0, our embedded vector engine, calls `std::debug_assert_matches`, which is
# still an unstable library feature on stable Rust 1.95 (error E0658). For that crate alone,
# and only for that crate, we let the stable compiler accept the feature gate
# (`RUSTC_BOOTSTRAP=1` + `-Zcrate-attr=feature(assert_matches)`). Every other crate, ours
# included, is compiled exactly as cargo asks. Remove this file once qdrant-edge publishes a
# release that builds on stable.
rustc="$1"; shift
case " $* " in
  *" --crate-name qdrant_edge "*)
    RUSTC_BOOTSTRAP=1 exec "$rustc" "$@" "-Zcrate-attr=feature(assert_matches)" ;;
  *)
    exec "$rustc" "$@" ;;
esac
