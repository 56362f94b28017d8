//! Nothing here: the benchmark is `benches/layer.rs`
//! (`cargo bench -p identity-client-bench`).
