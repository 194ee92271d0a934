//! `thinpool image load` / `thinpool import` on bad input (issue 14): filled in by its tests.
