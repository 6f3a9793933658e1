//! A small spinning thread pool for the CPU backend's parallel loops.
//!
//! Why not rayon: a decode step of a small model is a few hundred ops of
//! 5–50 µs each, issued one after another from the engine's thread. Rayon
//! injects each from outside its pool and puts the caller to sleep on a
//! latch, so every op pays a futex sleep and wake-up (measured: a visible
//! share of a decode step in `perf`). Here the caller takes part in its
//! own loop, and the other threads spin between ops (then park after
//! [`SPIN`] without work), as llama.cpp's thread pool does; handing out a
//! loop then costs an atomic store and a few cache-line transfers.
//!
//! Scheduling. `run(n, f)` calls `f(0..n)`, each index exactly once, on
//! whichever thread claims it first (a compare-and-swap on one word that
//! holds the loop's epoch and next index). A thread the OS has taken away
//! therefore delays a loop by at most the task it holds, not by the whole
//! loop. Which thread runs a task never changes what the task computes, so
//! results do not depend on timing.
//!
//! Nested or concurrent loops (a task that starts a loop, or a second
//! thread calling `run` while a loop is in flight, as parallel tests do)
//! run serially on the calling thread.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it parks.
const SPIN: Duration = Duration::from_millis(2);

/// The type-erased loop body: a data pointer and the function that calls
/// the closure behind it.
type Trampoline = unsafe fn(*const (), usize);

/// Tasks one loop can hand out (24 bits of the state word).
const MAX_TASKS: usize = (1 << 24) - 1;

/// The state word: the loop's epoch (16 bits), its task count (24 bits)
/// and the next task index (24 bits). Keeping the count in the same word as
/// the index means a claim can never pair one loop's index with another
/// loop's count.
fn pack(epoch: u64, tasks: u64, next: u64) -> u64 {
    (epoch << 48) | (tasks << 24) | next
}

fn unpack(state: u64) -> (u64, u64, u64) {
    (state >> 48, (state >> 24) & 0xff_ffff, state & 0xff_ffff)
}

struct Shared {
    state: AtomicU64,
    /// Tasks of the current loop that have finished.
    done: AtomicUsize,
    /// The current loop's closure and its trampoline.
    data: AtomicPtr<()>,
    call: AtomicUsize,
    /// A task panicked on a worker (the caller re-raises it).
    panicked: AtomicBool,
    /// Workers parked on `wake`.
    sleepers: Mutex<usize>,
    wake: Condvar,
}

/// The thread pool (one per process, see [`pool`]).
pub struct Pool {
    shared: Arc<Shared>,
    threads: usize,
    /// Held by the thread whose loop is in flight.
    caller: Mutex<()>,
}

thread_local! {
    /// True inside a task, where a nested loop runs serially.
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
}

/// The process-wide pool, sized by `LMQ_NUM_THREADS`, else
/// `RAYON_NUM_THREADS`, else the number of CPUs.
pub fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let from_env = |name: &str| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .filter(|&n| n > 0)
        };
        let threads = from_env("LMQ_NUM_THREADS")
            .or_else(|| from_env("RAYON_NUM_THREADS"))
            .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
            .unwrap_or(1);
        Pool::new(threads)
    })
}

/// A raw pointer that tasks may share; each task writes a disjoint part of
/// what it points to (every use states why).
pub struct SyncPtr<T>(pub *mut T);

// Manual impls: a derive would require `T: Copy`.
impl<T> Clone for SyncPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for SyncPtr<T> {}

// SAFETY: the pointer is only dereferenced by tasks that touch disjoint
// elements, and the loop that hands it out outlives them all.
unsafe impl<T> Send for SyncPtr<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    /// The pointer. (A method, so that closures capture the whole
    /// `SyncPtr`, which is `Sync`, rather than its raw-pointer field.)
    pub fn get(self) -> *mut T {
        self.0
    }
}

impl Pool {
    fn new(threads: usize) -> Pool {
        let shared = Arc::new(Shared {
            state: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            data: AtomicPtr::new(std::ptr::null_mut()),
            call: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleepers: Mutex::new(0),
            wake: Condvar::new(),
        });
        for i in 1..threads {
            let s = Arc::clone(&shared);
            let spawned = std::thread::Builder::new()
                .name(format!("lmq-cpu-{i}"))
                .spawn(move || worker(&s));
            if spawned.is_err() {
                // Fewer threads only make loops slower, never wrong.
                break;
            }
        }
        Pool {
            shared,
            threads,
            caller: Mutex::new(()),
        }
    }

    /// Threads that run loops, the caller included.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Calls `f(i)` for every `i` in `0..n`, spread over the pool, and
    /// returns when all calls have returned.
    pub fn run<F: Fn(usize) + Sync>(&self, n: usize, f: F) {
        if n == 0 {
            return;
        }
        if n > MAX_TASKS {
            // Never reached by the backend's loops; kept correct anyway.
            for start in (0..n).step_by(MAX_TASKS) {
                let len = MAX_TASKS.min(n - start);
                self.run_at_most_max(len, |i| f(start + i));
            }
            return;
        }
        self.run_at_most_max(n, f);
    }

    /// [`Pool::run`] for `n <= MAX_TASKS`.
    fn run_at_most_max<F: Fn(usize) + Sync>(&self, n: usize, f: F) {
        let serial = n == 1 || self.threads == 1 || IN_TASK.with(|t| t.get());
        let guard = if serial {
            None
        } else {
            self.caller.try_lock().ok()
        };
        let Some(_guard) = guard else {
            let was = IN_TASK.with(|t| t.replace(true));
            (0..n).for_each(&f);
            IN_TASK.with(|t| t.set(was));
            return;
        };
        unsafe fn trampoline<F: Fn(usize)>(data: *const (), i: usize) {
            // SAFETY: `data` is the `&F` that `run` published for this
            // loop, alive until `run` returns, which waits for every task.
            let f = unsafe { &*(data as *const F) };
            f(i);
        }
        let s = &*self.shared;
        s.done.store(0, Ordering::Relaxed);
        s.data
            .store(&f as *const F as *const () as *mut (), Ordering::Release);
        s.call
            .store(trampoline::<F> as Trampoline as usize, Ordering::Release);
        let epoch = (unpack(s.state.load(Ordering::Relaxed)).0 + 1) & 0xffff;
        // Publishing the new state releases the stores above.
        s.state.store(pack(epoch, n as u64, 0), Ordering::SeqCst);
        if *lock(&s.sleepers) > 0 {
            s.wake.notify_all();
        }
        IN_TASK.with(|t| t.set(true));
        let mine = claim_all(s, epoch);
        IN_TASK.with(|t| t.set(false));
        let total = s.done.fetch_add(mine, Ordering::AcqRel) + mine;
        if total < n {
            let mut spins = 0u32;
            while s.done.load(Ordering::Acquire) < n {
                spins += 1;
                if spins < 1 << 16 {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
        }
        if s.panicked.swap(false, Ordering::Relaxed) {
            panic!("a task of a CPU thread-pool loop panicked");
        }
    }
}

fn lock(m: &Mutex<usize>) -> std::sync::MutexGuard<'_, usize> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Claims and runs tasks of loop `epoch` until none is left; returns how
/// many this thread ran. A task's panic is caught and reported to the
/// caller, so that the loop completes before the closure it borrows goes
/// away.
fn claim_all(s: &Shared, epoch: u64) -> usize {
    // Acquire: a closure of a later loop, if read here, brings with it the
    // end of this loop's claims, so the claim below then fails.
    let data = s.data.load(Ordering::Acquire) as *const ();
    let call = s.call.load(Ordering::Acquire);
    let mut ran = 0;
    let mut cur = s.state.load(Ordering::Acquire);
    loop {
        let (e, n, next) = unpack(cur);
        if e != epoch || next >= n {
            return ran;
        }
        match s
            .state
            .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {
                // SAFETY: `call` was stored from a `Trampoline` for this
                // epoch's closure before the epoch was published; a claimed
                // task keeps the loop (and so the closure) alive until its
                // completion is counted, so `data` and `call` still belong
                // to this epoch.
                let f: Trampoline = unsafe { std::mem::transmute::<usize, Trampoline>(call) };
                let i = next as usize;
                // SAFETY: as above.
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe {
                    f(data, i)
                }));
                if r.is_err() {
                    s.panicked.store(true, Ordering::Relaxed);
                }
                ran += 1;
                cur = s.state.load(Ordering::Acquire);
            }
            Err(now) => cur = now,
        }
    }
}

fn worker(s: &Shared) {
    IN_TASK.with(|t| t.set(true));
    let mut seen = 0u64;
    loop {
        // Wait for a new loop: spin, then park.
        let start = Instant::now();
        let mut spins = 0u32;
        let epoch = loop {
            let e = unpack(s.state.load(Ordering::Acquire)).0;
            if e != seen {
                break e;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(256) || start.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            let mut sleepers = lock(&s.sleepers);
            *sleepers += 1;
            while unpack(s.state.load(Ordering::SeqCst)).0 == seen {
                sleepers = s
                    .wake
                    .wait_timeout(sleepers, Duration::from_millis(100))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
            *sleepers -= 1;
        };
        seen = epoch;
        // The task count and closure are read only after the epoch, and a
        // task is run only if its claim still carries this epoch.
        let ran = claim_all(s, epoch);
        if ran > 0 {
            s.done.fetch_add(ran, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_index_runs_once_and_nesting_is_serial() {
        let p = pool();
        for n in [0usize, 1, 2, 3, 17, 1000] {
            let hits: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
            p.run(n, |i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
                // A nested loop runs inline and still covers its range.
                let inner = AtomicU32::new(0);
                p.run(3, |_| {
                    inner.fetch_add(1, Ordering::Relaxed);
                });
                assert_eq!(inner.load(Ordering::Relaxed), 3);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
    }

    #[test]
    fn concurrent_callers_each_get_their_whole_loop() {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| {
                    for _ in 0..200 {
                        let sum = AtomicUsize::new(0);
                        pool().run(64, |i| {
                            sum.fetch_add(i, Ordering::Relaxed);
                        });
                        assert_eq!(sum.load(Ordering::Relaxed), 64 * 63 / 2);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("thread");
        }
    }
}
