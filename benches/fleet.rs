//! (being written) `just bench`.
fn main() {}
