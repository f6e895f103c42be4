//! rki-loadtest
