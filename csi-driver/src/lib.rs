//! Shoal CSI driver. The Identity, Controller and Node services arrive with the CSI work (issue 5); this crate holds nothing yet.
