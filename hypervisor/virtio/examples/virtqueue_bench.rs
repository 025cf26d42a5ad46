//! Placeholder so the workspace manifest parses while the benchmark is being written.
fn main() {}
