//! topic (in progress)
