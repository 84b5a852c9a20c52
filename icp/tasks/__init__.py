"""icp.tasks."""
