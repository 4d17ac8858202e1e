//! The naive diff layer: Docker's tar rules on top of a driver that can only
//! hand out a directory per layer (moby's `NaiveDiffDriver`).
//!
//! A driver implements [`LayerFs`] (Get/Put of a layer's root directory) and
//! gets `Diff`, `Changes`, `ApplyDiff` and `DiffSize` from [`NaiveDiff`].
