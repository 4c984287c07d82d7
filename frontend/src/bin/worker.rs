//! The model worker's entry point (Trunk builds it as `worker.js` with a loader shim).

use gloo_worker::Registrable;
use loci_frontend::protocol::Json;
use loci_frontend::worker::ModelWorker;

fn main() {
    console_error_panic_hook::set_once();
    ModelWorker::registrar().encoding::<Json>().register();
}
