//! Functions installed per backend type: the GPU kernels live with the model code (which holds
//! the GPU dependencies) and the cache, which decides when to run them, finds them here.

use std::any::{Any, TypeId};
use std::sync::RwLock;

/// One function of type `F` per backend type.
pub(crate) struct PerBackend(RwLock<Vec<(TypeId, Box<dyn Any + Send + Sync>)>>);

impl PerBackend {
    pub(crate) const fn new() -> Self {
        PerBackend(RwLock::new(Vec::new()))
    }

    /// Makes `f` backend `B`'s (replacing an earlier one unless `same` says it is that one:
    /// models install theirs on every forward pass, and the read lock answers that case).
    pub(crate) fn install<B: 'static, F: Copy + Send + Sync + 'static>(&self, f: F, same: fn(F, F) -> bool) {
        if self.get::<B, F>().is_some_and(|old| same(old, f)) {
            return;
        }
        let id = TypeId::of::<B>();
        if let Ok(mut fns) = self.0.write() {
            fns.retain(|(t, _)| *t != id);
            fns.push((id, Box::new(f)));
        }
    }

    /// Backend `B`'s function, if one is installed.
    pub(crate) fn get<B: 'static, F: Copy + 'static>(&self) -> Option<F> {
        let fns = self.0.read().ok()?;
        fns.iter()
            .find(|(t, _)| *t == TypeId::of::<B>())
            .and_then(|(_, f)| f.downcast_ref::<F>().copied())
    }

    /// How many backends have a function installed.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.0.read().map_or(0, |fns| fns.len())
    }
}
