//! When a training micro-batch is recorded as device work and replayed (CUDA graphs).
//!
//! A GPT micro-batch queues the same few hundred launches with the same arguments every step:
//! only the token ids differ, and those sit in device buffers uploaded before the work runs.
//! Recording the work once and replaying it saves the host's launch calls and most of the gaps
//! between launches. What may still differ from one micro-batch to the next is part of the
//! [`GraphKey`]: whether the gradients are zeroed first (the first micro-batch of a step) and
//! the loss weight (which a dynamic loss scale changes now and then).
//!
//! A recording must not plan or tune a GEMM, grow a scratch area or upload a kernel table: that
//! work waits on the device or allocates, which a recording refuses. So a key is recorded only
//! after it ran once eagerly without the backend's [`Backend::graph_epoch`] changing, and a
//! recording is replayed only at the epoch it was made at (anything that replaced memory it
//! addresses changes the epoch). After such a change the key runs eagerly once more and is
//! recorded again.
//!
//! [`Backend::graph_epoch`]: crate::backend::Backend::graph_epoch

/// What a recording fixed that a micro-batch could change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GraphKey {
    /// The micro-batch zeroes the gradients before accumulating into them.
    pub zero_grads: bool,
    /// Bits of the loss weight (`f32::to_bits`): the loss scale over the micro-batch count.
    pub loss_weight: u32,
}

/// How to run the next micro-batch of a key.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan<'a, G> {
    /// Queue the work as usual (then tell [`StepGraphs::ran_eagerly`]).
    Eager,
    /// Record the work, replay the recording (then tell [`StepGraphs::recorded`]).
    Record,
    /// Replay this recording.
    Replay(&'a G),
}

enum Slot<G> {
    /// The last eager run left the epoch at this value (`None`: it changed it).
    Ran(Option<u64>),
    /// Recorded at `epoch`.
    Recorded { graph: G, epoch: u64 },
}

/// The recordings of one set of activations, by key (a handful at most).
pub struct StepGraphs<G> {
    slots: Vec<(GraphKey, Slot<G>)>,
}

impl<G> Default for StepGraphs<G> {
    fn default() -> Self {
        Self { slots: Vec::new() }
    }
}

impl<G> StepGraphs<G> {
    /// How to run `key`'s next micro-batch when the backend's epoch is `epoch`.
    pub fn plan(&self, key: GraphKey, epoch: u64) -> Plan<'_, G> {
        match self.slots.iter().find(|(k, _)| *k == key) {
            Some((_, Slot::Recorded { graph, epoch: e })) if *e == epoch => Plan::Replay(graph),
            Some((_, Slot::Ran(Some(e)))) if *e == epoch => Plan::Record,
            _ => Plan::Eager,
        }
    }

    /// `key` ran eagerly; the epoch was `before` when it started and `after` when it ended.
    pub fn ran_eagerly(&mut self, key: GraphKey, before: u64, after: u64) {
        self.set(key, Slot::Ran((before == after).then_some(after)));
    }

    /// `key` was recorded as `graph` at `epoch`.
    pub fn recorded(&mut self, key: GraphKey, graph: G, epoch: u64) {
        self.set(key, Slot::Recorded { graph, epoch });
    }

    fn set(&mut self, key: GraphKey, slot: Slot<G>) {
        match self.slots.iter_mut().find(|(k, _)| *k == key) {
            Some((_, s)) => *s = slot,
            None => self.slots.push((key, slot)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIRST: GraphKey = GraphKey {
        zero_grads: true,
        loss_weight: 0x3f80_0000,
    };
    const LATER: GraphKey = GraphKey {
        zero_grads: false,
        loss_weight: 0x3f80_0000,
    };

    #[test]
    fn records_after_one_settled_eager_run_and_replays_at_that_epoch() {
        let mut g = StepGraphs::<&str>::default();
        assert_eq!(g.plan(FIRST, 0), Plan::Eager);
        // The first run tunes GEMMs: the epoch moves, so it is not ready to record.
        g.ran_eagerly(FIRST, 0, 5);
        assert_eq!(g.plan(FIRST, 5), Plan::Eager);
        g.ran_eagerly(FIRST, 5, 5);
        assert_eq!(g.plan(FIRST, 5), Plan::Record);
        // Keys are independent.
        assert_eq!(g.plan(LATER, 5), Plan::Eager);
        g.recorded(FIRST, "step", 5);
        assert_eq!(g.plan(FIRST, 5), Plan::Replay(&"step"));
    }

    #[test]
    fn a_changed_epoch_runs_eagerly_and_records_again() {
        let mut g = StepGraphs::<&str>::default();
        g.ran_eagerly(FIRST, 3, 3);
        g.recorded(FIRST, "old", 3);
        // Something between steps (an evaluation growing the scratch) moved the epoch.
        assert_eq!(g.plan(FIRST, 4), Plan::Eager);
        g.ran_eagerly(FIRST, 4, 4);
        assert_eq!(g.plan(FIRST, 4), Plan::Record);
        g.recorded(FIRST, "new", 4);
        assert_eq!(g.plan(FIRST, 4), Plan::Replay(&"new"));
        // An eager run that moved the epoch is not trusted for recording.
        g.ran_eagerly(LATER, 4, 6);
        assert_eq!(g.plan(LATER, 6), Plan::Eager);
    }
}
