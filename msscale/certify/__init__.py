"""Certification as a job: plan, shards, the job array, merge, counts files and results."""
