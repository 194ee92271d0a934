//! A directory tree as a tar stream: the flattened filesystem (`container export`). (Being
//! written.)
