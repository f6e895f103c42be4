//! frame (in progress)
