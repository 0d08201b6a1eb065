"""Deployment-side setup that prefect.yaml cannot declare: the automations."""
