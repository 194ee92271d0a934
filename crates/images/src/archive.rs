//! Image archives: reading `docker save` tarballs and OCI image layouts (tar or directory),
//! writing the archive `image save` produces. (Being written.)
