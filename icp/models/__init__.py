"""icp.models."""
