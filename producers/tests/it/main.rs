//! Integration tests of the producer services (filled in below).
