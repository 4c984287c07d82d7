//! Loci's web app: the leptos UI (`main.rs` with its `screens` and `components`) over two
//! engines (`engine`): the in-tab one — model workers (`worker`) driven from the page by a pool
//! (`pool`), weights downloaded once into the Cache API (`files`) — and the server's API
//! (`http`). Both speak `loci-core`'s request and result types.

pub mod bench;
pub mod engine;
pub mod files;
pub mod http;
pub mod pool;
pub mod protocol;
pub mod worker;
