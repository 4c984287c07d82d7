//! The model worker's entry point (Trunk builds it as `worker.js` with a loader shim).

use std::alloc::{GlobalAlloc, Layout, System};

use loci_frontend::protocol::FromWorker;

/// The system allocator, telling the page when memory cannot grow: the allocation then fails
/// and the worker stops, and the page names the limit that was hit and replaces the worker.
struct Watched;

unsafe impl GlobalAlloc for Watched {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if p.is_null() {
            out_of_memory(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if p.is_null() {
            out_of_memory(layout.size());
        }
        p
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if p.is_null() {
            out_of_memory(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Watched = Watched;

fn out_of_memory(bytes: usize) {
    use std::sync::atomic::{AtomicBool, Ordering};
    // Once only: the message allocates too (a little: a failed request of megabytes leaves room
    // for it), and must not recurse when even that fails.
    static TOLD: AtomicBool = AtomicBool::new(false);
    if TOLD.swap(true, Ordering::Relaxed) {
        return;
    }
    #[cfg(target_arch = "wasm32")]
    let heap = core::arch::wasm32::memory_size(0) as u64 * 65_536;
    #[cfg(not(target_arch = "wasm32"))]
    let heap = 0;
    loci_frontend::worker::post(&FromWorker::OutOfMemory {
        bytes: bytes as u64,
        heap,
    });
}

fn main() {
    console_error_panic_hook::set_once();
    loci_frontend::worker::start();
}
