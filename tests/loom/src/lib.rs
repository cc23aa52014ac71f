//! Empty: the model checks are `tests/state.rs`, built only with `--cfg loom` (`make test-loom`).
