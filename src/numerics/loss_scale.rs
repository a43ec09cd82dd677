//! Dynamic loss scaling for fp16 training.
//!
//! fp16 keeps only 5 exponent bits: small activation gradients flush to zero. Multiplying the loss
//! (and so every gradient) by a large scale S moves them into range; the optimizer divides by S
//! again. When a step's gradients overflow (inf or NaN anywhere), the step is skipped and S
//! shrinks; after `growth_interval` clean steps in a row S grows back, so it hovers just under
//! the overflow point.

use serde::{Deserialize, Serialize};

/// The loss scale and its update rule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    /// The current scale S.
    pub scale: f64,
    /// Factor S grows by after `growth_interval` clean steps.
    pub growth: f64,
    /// Factor S shrinks by after an overflow.
    pub backoff: f64,
    /// Clean steps in a row before S grows.
    pub growth_interval: u64,
    /// Clean steps since the last change of S.
    pub clean_steps: u64,
    /// Steps skipped because of overflow, over the whole run.
    pub skipped_steps: u64,
}

/// Scales are kept within the range where 1/S is a normal f32, so unscaling stays exact-ish.
const MAX_SCALE: f64 = 1.0e30;
const MIN_SCALE: f64 = 1.0e-30;

impl LossScaler {
    /// A scaler starting at `scale`.
    pub fn new(scale: f64, growth: f64, backoff: f64, growth_interval: u64) -> Self {
        Self {
            scale,
            growth,
            backoff,
            growth_interval: growth_interval.max(1),
            clean_steps: 0,
            skipped_steps: 0,
        }
    }

    /// Records whether this step's gradients were all finite; returns whether the optimizer
    /// should apply the step (false: skip it, the scale has backed off).
    pub fn update(&mut self, grads_finite: bool) -> bool {
        if grads_finite {
            self.clean_steps += 1;
            if self.clean_steps >= self.growth_interval {
                self.scale = (self.scale * self.growth).min(MAX_SCALE);
                self.clean_steps = 0;
            }
            true
        } else {
            self.scale = (self.scale * self.backoff).max(MIN_SCALE);
            self.clean_steps = 0;
            self.skipped_steps += 1;
            false
        }
    }

    /// True when the scale has backed off to its floor: gradients overflow whatever the scale,
    /// so training has diverged rather than hit an fp16 range problem.
    pub fn exhausted(&self) -> bool {
        self.scale <= MIN_SCALE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_skips_the_step_and_backs_off() {
        let mut s = LossScaler::new(65536.0, 2.0, 0.5, 3);
        assert!(!s.update(false));
        assert_eq!(s.scale, 32768.0);
        assert_eq!(s.skipped_steps, 1);
        assert_eq!(s.clean_steps, 0);
    }

    #[test]
    fn clean_steps_grow_the_scale_after_the_interval() {
        let mut s = LossScaler::new(1024.0, 2.0, 0.5, 3);
        assert!(s.update(true));
        assert!(s.update(true));
        assert_eq!(s.scale, 1024.0);
        assert!(s.update(true));
        assert_eq!(s.scale, 2048.0);
        // An overflow resets the count of clean steps.
        s.update(true);
        s.update(false);
        s.update(true);
        s.update(true);
        assert_eq!(s.scale, 1024.0);
        assert!(s.update(true));
        assert_eq!(s.scale, 2048.0);
    }

    #[test]
    fn scale_stays_in_range() {
        let mut s = LossScaler::new(1.0e29, 100.0, 1.0e-10, 1);
        s.update(true);
        assert_eq!(s.scale, MAX_SCALE);
        for _ in 0..10 {
            s.update(false);
        }
        assert_eq!(s.scale, MIN_SCALE);
        assert!(s.exhausted());
    }
}
