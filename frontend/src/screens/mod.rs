//! The app's screens, one per route: each a component over its own state, which is created
//! once (in `main`) and kept while other screens show.

pub mod bench;
pub mod edit;
pub mod edit_actions;
pub mod edit_tab;
pub mod evaluate;
pub mod sequence_view;
pub mod study;
pub mod trace;
