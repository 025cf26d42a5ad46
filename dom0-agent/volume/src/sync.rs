//! The two primitives [`crate::pool::SharedPool`] needs: a mutual-exclusion [`Lock`] and an
//! [`Event`] that threads wait on until something changed.
//!
//! With the `std` feature (host tools) they are std's `Mutex` and `Condvar`, so a waiting
//! thread sleeps in the kernel. Without it (dom0 on bare metal) the lock is a spin lock and a
//! waiter spins on the event's counter (`core::hint::spin_loop`): dom0 vCPUs waiting for a
//! volume request keep their CPU, which the hypervisor's scheduler accounts like any other
//! work.

#[cfg(feature = "std")]
mod imp {
    extern crate std;

    use core::time::Duration;
    use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

    /// A mutual-exclusion lock.
    pub struct Lock<T>(Mutex<T>);

    impl<T> Lock<T> {
        pub fn new(v: T) -> Self {
            Self(Mutex::new(v))
        }
        /// Takes the lock (a panic while it was held does not poison it for the others).
        pub fn lock(&self) -> MutexGuard<'_, T> {
            self.0.lock().unwrap_or_else(PoisonError::into_inner)
        }
        pub fn into_inner(self) -> T {
            self.0.into_inner().unwrap_or_else(PoisonError::into_inner)
        }
    }

    /// A counter of changes and the threads waiting for it to move.
    pub struct Event {
        epoch: Mutex<u64>,
        cv: Condvar,
    }

    impl Event {
        pub fn new() -> Self {
            Self {
                epoch: Mutex::new(0),
                cv: Condvar::new(),
            }
        }
        pub fn epoch(&self) -> u64 {
            *self.epoch.lock().unwrap_or_else(PoisonError::into_inner)
        }
        pub fn notify(&self) {
            let mut e = self.epoch.lock().unwrap_or_else(PoisonError::into_inner);
            *e += 1;
            drop(e);
            self.cv.notify_all();
        }
        /// Waits until the counter is past `seen`, or `ms` milliseconds passed.
        pub fn wait_past(&self, seen: u64, ms: u64) {
            let g = self.epoch.lock().unwrap_or_else(PoisonError::into_inner);
            let _ = self
                .cv
                .wait_timeout_while(g, Duration::from_millis(ms), |e| *e == seen)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

#[cfg(not(feature = "std"))]
mod imp {
    use core::sync::atomic::{AtomicU64, Ordering};

    /// A mutual-exclusion lock (a spin lock).
    pub struct Lock<T>(spin::Mutex<T>);

    impl<T> Lock<T> {
        pub fn new(v: T) -> Self {
            Self(spin::Mutex::new(v))
        }
        pub fn lock(&self) -> spin::MutexGuard<'_, T> {
            self.0.lock()
        }
        pub fn into_inner(self) -> T {
            self.0.into_inner()
        }
    }

    /// A counter of changes that waiters spin on.
    pub struct Event {
        epoch: AtomicU64,
    }

    impl Event {
        pub fn new() -> Self {
            Self {
                epoch: AtomicU64::new(0),
            }
        }
        pub fn epoch(&self) -> u64 {
            self.epoch.load(Ordering::Acquire)
        }
        pub fn notify(&self) {
            self.epoch.fetch_add(1, Ordering::AcqRel);
        }
        /// Spins until the counter is past `seen`, or a bounded number of spins (about `ms`
        /// milliseconds' worth, roughly) passed.
        pub fn wait_past(&self, seen: u64, ms: u64) {
            for _ in 0..ms.saturating_mul(20_000) {
                if self.epoch() != seen {
                    return;
                }
                core::hint::spin_loop();
            }
        }
    }
}

pub(crate) use imp::{Event, Lock};
