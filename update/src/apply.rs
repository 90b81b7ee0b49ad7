//! Applying a bundle on a box (to be written).
