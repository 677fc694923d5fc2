"""Stages: orchestration of loading, math and writing for one step of the pipeline."""
