//! An optional system BLAS for native f32 matrix products, found at run time.
//!
//! candle's own CPU kernel (the `gemm` crate) is portable and good, but a tuned BLAS such as
//! OpenBLAS reaches more of the processor's peak on the products a transformer runs. Loci opens
//! one with `dlopen` when the process first asks, so nothing links against it: with no BLAS on
//! the machine (or on wasm32, where this module is absent) every product stays on candle's
//! kernel. `LOCI_BLAS` names a library file to use instead of the usual names, or `off` to use
//! none.

use std::ffi::c_int;
use std::sync::OnceLock;

/// `cblas_sgemm`'s signature (row- or column-major, transposes as CBLAS enums).
type Sgemm = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
    *const f32,
    c_int,
    *const f32,
    c_int,
    f32,
    *mut f32,
    c_int,
);

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

/// Library names tried in order when `LOCI_BLAS` is unset: OpenBLAS (Debian's
/// `libopenblas0`), then BLIS.
const CANDIDATES: [&str; 4] = [
    "libopenblas.so.0",
    "libopenblas.so",
    "libblis.so.4",
    "libopenblas.dylib",
];

/// A BLAS library opened at run time.
pub struct Blas {
    name: String,
    sgemm: Sgemm,
    set_threads: Option<unsafe extern "C" fn(c_int)>,
    // Kept open for the process's life: the function pointers above point into it.
    _lib: libloading::Library,
}

impl std::fmt::Debug for Blas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blas").field("name", &self.name).finish()
    }
}

/// The system BLAS, opened once per process; `None` when none was found or `LOCI_BLAS=off`.
pub fn system() -> Option<&'static Blas> {
    static BLAS: OnceLock<Option<Blas>> = OnceLock::new();
    BLAS.get_or_init(|| match std::env::var("LOCI_BLAS") {
        Ok(v) if v == "off" || v.is_empty() => None,
        Ok(path) => Blas::open(&path),
        Err(_) => CANDIDATES.iter().find_map(|n| Blas::open(n)),
    })
    .as_ref()
}

impl Blas {
    fn open(name: &str) -> Option<Blas> {
        // SAFETY: loading a shared library runs its initialisers; the BLAS libraries named here
        // (or by the user in LOCI_BLAS) have no initialisers with preconditions.
        let lib = unsafe { libloading::Library::new(name) }.ok()?;
        // SAFETY: the symbols are read with CBLAS's documented C signatures.
        let sgemm = unsafe { *lib.get::<Sgemm>(b"cblas_sgemm\0").ok()? };
        let set_threads = unsafe {
            lib.get::<unsafe extern "C" fn(c_int)>(b"openblas_set_num_threads\0")
                .ok()
                .map(|s| *s)
        };
        let blas = Blas {
            name: name.to_string(),
            sgemm,
            set_threads,
            _lib: lib,
        };
        // Loci parallelises over its own workers; each product runs on its caller's thread
        // unless a caller asks for more with `set_threads`.
        blas.set_threads(1);
        Some(blas)
    }

    /// The library's file name, as opened.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Threads the library uses inside each product (OpenBLAS only; others keep their own).
    pub fn set_threads(&self, n: usize) {
        if let Some(f) = self.set_threads {
            // SAFETY: openblas_set_num_threads takes any positive count.
            unsafe { f(n.max(1) as c_int) }
        }
    }

    /// `c = a · bᵀ` for row-major `a` `[m, k]` and `b` `[n, k]`, into `c` `[m, n]`.
    pub fn matmul_bt(&self, a: &[f32], b: &[f32], c: &mut [f32], m: usize, n: usize, k: usize) {
        self.gemm(a, false, b, true, c, (m, n, k));
    }

    /// `c = op(a) · op(b)` for row-major, tightly packed operands: `op(a)` is `[m, k]` (stored
    /// `[k, m]` when `ta`), `op(b)` is `[k, n]` (stored `[n, k]` when `tb`), `c` is `[m, n]`.
    pub fn gemm(
        &self,
        a: &[f32],
        ta: bool,
        b: &[f32],
        tb: bool,
        c: &mut [f32],
        (m, n, k): (usize, usize, usize),
    ) {
        assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
        assert!(m.max(n).max(k) <= c_int::MAX as usize);
        if m == 0 || n == 0 {
            return;
        }
        if k == 0 {
            c[..m * n].fill(0.0);
            return;
        }
        let (lda, ldb) = (if ta { m } else { k }, if tb { k } else { n });
        let flag = |t| if t { TRANS } else { NO_TRANS };
        // SAFETY: the slices hold the [m, k], [k, n] and [m, n] operands checked above, with the
        // leading dimensions of tightly packed row-major storage.
        unsafe {
            (self.sgemm)(
                ROW_MAJOR,
                flag(ta),
                flag(tb),
                m as c_int,
                n as c_int,
                k as c_int,
                1.0,
                a.as_ptr(),
                lda as c_int,
                b.as_ptr(),
                ldb as c_int,
                0.0,
                c.as_mut_ptr(),
                n as c_int,
            )
        }
    }
}
