"""icp.eval."""
