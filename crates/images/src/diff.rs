//! The difference between two trees as a layer tar with whiteouts (`container commit`): the
//! reverse of the applier. (Being written.)
