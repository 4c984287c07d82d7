//! Loci's web app: the leptos UI (`main.rs`), and the in-tab engine — model workers (`worker.rs`)
//! driven from the page by a pool (`pool`), with weights downloaded once into the Cache API
//! (`files`). Both engines speak `loci-core`'s request and result types.

pub mod files;
pub mod pool;
pub mod protocol;
pub mod worker;
