//! DUKPT key derivation (to be written: TDES per X9.24-1-2009, AES per X9.24-3-2017).
