//! Loci's command line and server over `loci-core`, as a library: the `loci` binary is its
//! argument parsing, and the Python package runs the same commands (`cli::embedded`) on the
//! model it holds. Both stand on `workspace` (what they share); neither imports the other.

pub mod cli;
pub mod server;
pub mod workspace;
