//! Which 4-bit linear a model calls after which. A model calls its linears
//! in a fixed order, so the decode L2 prefetch (`l2_ahead.rs`) learns it
//! from the calls it sees and expects the linear that followed last time.

use std::collections::HashMap;

/// The learned order of calls, by linear id.
#[derive(Debug, Default)]
pub(super) struct CallOrder {
    /// The linear that followed each one last time.
    next: HashMap<usize, usize>,
    last: Option<usize>,
}

impl CallOrder {
    /// Records a call of `id` (following the previous call's linear) and
    /// returns the linear that followed `id` last time, if it was another.
    pub fn call(&mut self, id: usize) -> Option<usize> {
        if let Some(prev) = self.last.replace(id) {
            if prev != id {
                self.next.insert(prev, id);
            }
        }
        self.next.get(&id).copied().filter(|&n| n != id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_a_cycle_and_relearns_a_change() {
        let mut order = CallOrder::default();
        // First pass: nothing is known yet.
        for id in 0..4 {
            assert_eq!(order.call(id), None, "call {id} of the first pass");
        }
        // Second pass: each call expects the one after it; the cycle
        // closes from 3 back to 0.
        assert_eq!(order.call(0), Some(1));
        assert_eq!(order.call(1), Some(2));
        assert_eq!(order.call(2), Some(3));
        assert_eq!(order.call(3), Some(0));
        // Another order (2 skipped) replaces what it contradicts.
        assert_eq!(order.call(0), Some(1));
        assert_eq!(order.call(1), Some(2));
        assert_eq!(order.call(3), Some(0));
        assert_eq!(order.call(0), Some(1));
        assert_eq!(order.call(1), Some(3));
    }

    #[test]
    fn a_repeated_call_is_not_its_own_successor() {
        let mut order = CallOrder::default();
        order.call(5);
        order.call(5);
        order.call(7);
        assert_eq!(order.call(5), Some(7));
        assert_eq!(order.call(5), Some(7));
    }
}
