//! Running compute on rayon's pool rather than beside it.
//!
//! A parallel op started from a thread outside the pool (the main thread, the server's engine
//! thread) hands its work to the pool and sleeps on a lock until a worker has done it: a mutex,
//! a wake-up and a context switch per op. A small model's training step or decode step is
//! hundreds of such ops, and at the tiny benchmark shape those hand-offs cost about a tenth of
//! the SFT step. Started from a worker thread, the same ops put their pieces on that worker's
//! own queue and it works on them itself while the other workers steal.

/// Runs `f` on a rayon worker thread (here, when this already is one) and returns its result.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn runs_on_a_worker_and_returns_the_result() {
        assert_eq!(rayon::current_thread_index(), None);
        let (on_worker, value) = super::on_pool(|| (rayon::current_thread_index().is_some(), 7));
        assert!(on_worker);
        assert_eq!(value, 7);
        // Nested: already on a worker, so it runs in place.
        let nested = super::on_pool(|| super::on_pool(rayon::current_thread_index));
        assert!(nested.is_some());
    }
}
