"""The iomux conformance suite."""
