//! TR-31 key blocks (to be written).
