//! Placeholder until the server is wired.
fn main() {}
