"""icp.data."""
