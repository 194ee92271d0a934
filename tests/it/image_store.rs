//! `thinpool image` and `thinpool container` end to end (issue 14): filled in by its tests.
