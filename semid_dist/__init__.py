"""semid_dist: catalog-scale semantic IDs as a distributed, versioned batch job."""

__version__ = "0.1.0"
