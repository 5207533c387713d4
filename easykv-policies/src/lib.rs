//! easykv-policies
