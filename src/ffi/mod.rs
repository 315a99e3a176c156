//! C ABI (see include/sfr.h).
