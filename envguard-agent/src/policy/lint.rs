//! (placeholder while the lint pass is written)
