//! rki-device-sim
